"""Store operations for what devices send with an idempotency key (a part of `Store`):
feedback, routing reports and update statuses, each stored once per device and key, in batches
whose every item is acknowledged only after their commit; and the sums read from them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from cloud_agent.errors import StoreError
from cloud_agent.store import tables as t
from cloud_agent.store.database import Transactions, now
from cloud_agent.store.records import (
    FeedbackSummary,
    NewFeedback,
    NewReport,
    NewUpdateStatus,
    RouteCounts,
    RoutingSummary,
)

__all__ = ["KeyedMessageStore"]

_Keyed = t.Feedback | t.Report | t.StatusReport
"""Tables of messages stored once per device and idempotency key."""
_FollowUp = Callable[[AsyncSession, list[dict[str, Any]]], Awaitable[None]]


class KeyedMessageStore(Transactions):
    """Feedback, device reports and update statuses: stored once per (device, key)."""

    async def add_feedback(
        self,
        device_id: str,
        idempotency_key: str,
        request_id: str,
        rating: str,
        correction: str | None = None,
        adapter_version: int | None = None,
    ) -> bool:
        """Store one feedback; True if its key was stored before (a resend)."""
        item = NewFeedback(
            device_id, idempotency_key, request_id, rating, correction, adapter_version
        )
        return (await self.add_feedback_batch([item]))[item]

    async def add_feedback_batch(self, items: Sequence[NewFeedback]) -> dict[NewFeedback, bool]:
        """Store many feedbacks in one transaction, each once per device and idempotency key;
        returns, for each, whether its key was stored before (a resend, or an earlier item of
        this batch). Nothing is stored if the transaction fails."""
        stored_at = now()
        rows = [
            {"device_id": f.device_id, "idempotency_key": f.idempotency_key,
             "request_id": f.request_id, "rating": f.rating, "correction": f.correction,
             "created_at": stored_at, "adapter_version": f.adapter_version}
            for f in items
        ]  # fmt: skip
        return dict(zip(items, await self._insert_once(t.Feedback, rows), strict=True))

    async def add_report(self, item: NewReport) -> bool:
        """Store one device report; True if its key was stored before (a resend)."""
        return (await self.add_report_batch([item]))[item]

    async def add_report_batch(self, items: Sequence[NewReport]) -> dict[NewReport, bool]:
        """Store many device reports in one transaction, like `add_feedback_batch`."""
        stored_at = now()
        rows = [
            {"device_id": r.device_id, "idempotency_key": r.idempotency_key, "body": r.body,
             "created_at": stored_at, "period_start": r.period_start, "period_end": r.period_end,
             "adapter_version": r.adapter_version, "local": r.routes.local,
             "cloud": r.routes.cloud, "local_only": r.routes.local_only,
             "local_fallback": r.routes.local_fallback}
            for r in items
        ]  # fmt: skip

        async def reasons(s: AsyncSession, stored: list[dict[str, Any]]) -> None:
            rows = [
                {"device_id": r["device_id"], "idempotency_key": r["idempotency_key"],
                 "reason": reason, "count": count, "period_end": r["period_end"],
                 "created_at": stored_at}
                for r in stored
                for reason, count in (r["body"].get("reasons") or {}).items()
            ]  # fmt: skip
            if rows:
                await s.execute(insert(t.ReportReason), rows)

        return dict(zip(items, await self._insert_once(t.Report, rows, reasons), strict=True))

    async def routing_summary(
        self, since: datetime, *, device_id: str | None = None, top_reasons: int = 20
    ) -> RoutingSummary:
        """Where requests were answered, summed over the device reports of periods ending at
        or after `since` (of one device, or the whole fleet): in all, by the adapter version
        the devices ran, and the router's `top_reasons` most frequent reasons; with the tokens
        the cloud spent on the escalations logged since then."""
        r, why, it = t.Report, t.ReportReason, t.Interaction
        window = [r.period_end >= since]
        why_window = [why.period_end >= since]
        it_window = [it.created_at >= since]
        if device_id is not None:
            window.append(r.device_id == device_id)
            why_window.append(why.device_id == device_id)
            it_window.append(it.device_id == device_id)
        sums = [func.sum(c) for c in (r.local, r.cloud, r.local_only, r.local_fallback)]
        async with self._tx() as s:
            reports, devices = (
                await s.execute(
                    select(func.count(), func.count(r.device_id.distinct())).where(*window)
                )
            ).one()
            by_version = list(
                await s.execute(
                    select(r.adapter_version, *sums).where(*window).group_by(r.adapter_version)
                )
            )
            total = func.sum(why.count)
            reasons = (
                await s.execute(
                    select(why.reason, total)
                    .where(*why_window)
                    .group_by(why.reason)
                    .order_by(total.desc(), why.reason)
                    .limit(top_reasons)
                )
            ).all()
            tokens = await s.scalar(
                select(func.coalesce(func.sum(it.prompt_tokens + it.completion_tokens), 0)).where(
                    *it_window
                )
            )
        # The base model first, then adapters by version.
        by_version.sort(key=lambda row: -1 if row[0] is None else row[0])
        versions = {version: RouteCounts(*map(int, counts)) for version, *counts in by_version}
        return RoutingSummary(
            since=since,
            reports=int(reports),
            devices=int(devices),
            by_adapter_version=versions,
            reasons={reason: int(count) for reason, count in reasons},
            cloud_tokens=int(tokens or 0),
        )

    async def _insert_once(
        self, table: type[_Keyed], rows: list[dict[str, Any]], then: _FollowUp | None = None
    ) -> list[bool]:
        """Insert the rows whose (device_id, idempotency_key) is new, in one transaction;
        returns, for each row, whether its key was stored before. `then(session, stored)`
        runs in the same transaction with the rows inserted."""
        try:
            return await self._insert_new(table, rows, then)
        except IntegrityError:
            # Another replica stored one of these keys between the read and the insert; read
            # again, and this time it is among the stored ones.
            try:
                return await self._insert_new(table, rows, then)
            except IntegrityError as exc:
                raise StoreError(f"{table.__tablename__} refused by the database") from exc

    async def _insert_new(
        self, table: type[_Keyed], rows: list[dict[str, Any]], then: _FollowUp | None
    ) -> list[bool]:
        columns = (table.device_id, table.idempotency_key)
        wanted = {(r["device_id"], r["idempotency_key"]) for r in rows}
        async with self._tx() as s:
            query = select(*columns).where(tuple_(*columns).in_(wanted))
            seen = {(row[0], row[1]) for row in await s.execute(query)}
            stored_before = []
            fresh = []
            for r in rows:
                key = (r["device_id"], r["idempotency_key"])
                stored_before.append(key in seen)
                if key not in seen:
                    seen.add(key)
                    fresh.append(r)
            if fresh:
                await s.execute(insert(table), fresh)
                if then is not None:
                    await then(s, fresh)
        return stored_before

    async def add_update_status(
        self,
        device_id: str,
        idempotency_key: str,
        version: int,
        status: str,
        reason: str | None,
        self_check: dict[str, float],
    ) -> bool:
        """Store one update status; True if its key was stored before (a resend)."""
        item = NewUpdateStatus(device_id, idempotency_key, version, status, reason, self_check)
        return (await self.add_update_status_batch([item]))[item]

    async def add_update_status_batch(
        self, items: Sequence[NewUpdateStatus]
    ) -> dict[NewUpdateStatus, bool]:
        """Store many update statuses in one transaction, like `add_feedback_batch`, and with
        each new one, the device's deployment of that version (for published versions)."""
        stored_at = now()
        rows = [
            {"device_id": u.device_id, "idempotency_key": u.idempotency_key,
             "version": u.version, "status": u.status, "created_at": stored_at}
            for u in items
        ]  # fmt: skip
        first: dict[tuple[str, str], NewUpdateStatus] = {}
        for u in items:  # the first of a key is the one stored
            first.setdefault((u.device_id, u.idempotency_key), u)

        async def deploy(s: AsyncSession, stored: list[dict[str, Any]]) -> None:
            versions = {r["version"] for r in stored}
            published = set(
                await s.scalars(select(t.Adapter.version).where(t.Adapter.version.in_(versions)))
            )
            for r in stored:  # in order: the latest status of a device's version wins
                if r["version"] in published:
                    u = first[(r["device_id"], r["idempotency_key"])]
                    await s.merge(
                        t.Deployment(
                            device_id=u.device_id, version=u.version, status=u.status,
                            reason=u.reason, self_check=dict(u.self_check), updated_at=stored_at,
                        )
                    )  # fmt: skip

        return dict(zip(items, await self._insert_once(t.StatusReport, rows, deploy), strict=True))

    async def feedback_summary(self) -> FeedbackSummary:
        async with self._tx() as s:
            rows = (
                await s.execute(
                    select(
                        t.Feedback.rating, func.count(), func.count(t.Feedback.correction)
                    ).group_by(t.Feedback.rating)
                )
            ).all()
        counts = {rating: (n, c) for rating, n, c in rows}
        return FeedbackSummary(
            positive=counts.get("positive", (0, 0))[0],
            negative=counts.get("negative", (0, 0))[0],
            corrections=sum(c for _, c in counts.values()),
        )
