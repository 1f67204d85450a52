"""`Store`: every read and write the cloud agent makes, over SQLAlchemy's async engine.

SQLite (the embedded default, ``sqlite+aiosqlite:///path``) runs in WAL mode with
``synchronous=FULL`` so an acknowledged write survives a crash; the interaction log's batches go
through a synchronous connection on a thread of their own (`_SqliteLog`); PostgreSQL
(``postgresql+asyncpg://...``) serves several replicas. The schema is migrated with Alembic on
open. Database errors are mapped at this boundary: `StoreUnavailable` (retryable: the database
is down or locked) and `StoreError` for the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydantic_core
from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Table,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import URL, Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session

from cloud_agent.errors import EnrollmentRefused, StoreError, StoreUnavailable
from cloud_agent.store import tables as t
from cloud_agent.store.jobs import JobStore
from cloud_agent.store.records import (
    DeviceRecord,
    FeedbackSummary,
    InteractionRecord,
    NewFeedback,
    NewInteraction,
    NewReport,
    NewUpdateStatus,
    RouteCounts,
    RoutingSummary,
    SessionEvent,
)
from cloud_agent.store.rollouts import RolloutStore

__all__ = ["MAX_ROUTING_HOURS", "MAX_TOKEN_NOTE", "Store", "hash_token", "sqlite_url"]

MAX_TOKEN_NOTE = 256
"""The longest note an enrollment token keeps (its column's size)."""
MAX_ROUTING_HOURS = 24 * 366
"""The widest window the routing summary is asked for through the admin API and the CLI."""

_Keyed = t.Feedback | t.Report | t.StatusReport
"""Tables of messages stored once per device and idempotency key."""
_FollowUp = Callable[[AsyncSession, list[dict[str, Any]]], Awaitable[None]]

MIGRATIONS = Path(__file__).with_name("migrations")


def _now() -> datetime:
    return datetime.now(UTC)


def hash_token(token: str) -> str:
    """Enrollment tokens are stored hashed: a leaked database does not leak usable tokens."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def sqlite_url(path: str | Path) -> str:
    return f"sqlite+aiosqlite:///{Path(path).resolve()}"


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def _upgrade(connection: Connection) -> None:
    cfg = _alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


def _device(row: t.Device) -> DeviceRecord:
    return DeviceRecord(
        id=row.id,
        public_key=row.public_key,
        name=row.name,
        created_at=row.created_at,
        last_seen_at=row.last_seen_at,
        revoked_at=row.revoked_at,
        adapter_version=row.adapter_version,
        privacy_violations=row.privacy_violations,
    )


class Store(JobStore, RolloutStore):
    """The cloud agent's persistent state."""

    def __init__(self, engine: AsyncEngine, *, lock_timeout_s: float = 15.0) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        sqlite = engine.dialect.name == "sqlite"
        self._sqlite_interactions = (
            _SqliteBatchInsert.for_dialect(t.INTERACTIONS, engine.dialect) if sqlite else None
        )
        self._log = (
            _SqliteLog(engine.url, lock_timeout_s)
            if sqlite and engine.url.database not in (None, "", ":memory:")
            else None
        )

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True, lock_timeout_s: float = 15.0) -> Store:
        """Connect to `url` and bring its schema up to date.

        `lock_timeout_s` is how long a SQLite write waits for another writer before the store
        reports itself unavailable.
        """
        # JSON columns are written by pydantic-core's serializer: a fifth of the time of
        # `json.dumps` for the small lists an interaction holds (three per logged request).
        kwargs: dict[str, Any] = {"json_serializer": _to_json}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": lock_timeout_s}
        else:
            kwargs.update(pool_pre_ping=True, pool_size=5, max_overflow=10)
        engine = create_async_engine(url, **kwargs)
        if url.startswith("sqlite"):
            _set_sqlite_pragmas_on_connect(engine.sync_engine, lock_timeout_s)
        store = cls(engine, lock_timeout_s=lock_timeout_s)
        try:
            if migrate:
                async with engine.begin() as conn:
                    await conn.run_sync(_upgrade)
        except (OSError, SQLAlchemyError) as exc:
            await store.close()
            raise StoreUnavailable(f"cannot open the store: {exc}") from exc
        return store

    async def close(self) -> None:
        if self._log is not None:
            await self._log.close()
        await self.engine.dispose()

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncSession]:
        """One transaction; database errors leave it as `StoreError`/`StoreUnavailable`."""
        with _mapped_errors():
            async with self._sessions() as session, session.begin():
                yield session

    async def ping(self) -> None:
        """Raise `StoreUnavailable` unless the database answers."""
        async with self._tx() as s:
            await s.execute(select(1))

    # --- devices and enrollment -----------------------------------------------------------

    async def create_enrollment_token(
        self, ttl: timedelta = timedelta(days=7), note: str | None = None
    ) -> str:
        """A new one-time token (ValueError for a note longer than `MAX_TOKEN_NOTE`)."""
        if note is not None and len(note) > MAX_TOKEN_NOTE:
            raise ValueError(f"a token's note holds at most {MAX_TOKEN_NOTE} characters")
        token = f"elt_{secrets.token_urlsafe(24)}"
        now = _now()
        async with self._tx() as s:
            s.add(
                t.EnrollmentToken(
                    token_sha256=hash_token(token), created_at=now, expires_at=now + ttl, note=note
                )
            )
        return token

    async def enroll_device(
        self, token: str, device_id: str, public_key: str, name: str | None = None
    ) -> DeviceRecord:
        """Consume a one-time token and store the device, atomically."""
        now = _now()
        async with self._tx() as s:
            row = await s.get(t.EnrollmentToken, hash_token(token), with_for_update=True)
            if row is None or row.used_at is not None or row.expires_at < now:
                raise EnrollmentRefused("enrollment token unknown, used or expired")
            existing = await s.scalar(select(t.Device).where(t.Device.public_key == public_key))
            if existing is not None:
                raise EnrollmentRefused("this public key is already enrolled")
            row.used_at, row.device_id = now, device_id
            device = t.Device(
                id=device_id, public_key=public_key, name=name, created_at=now,
                privacy_violations=0,
            )  # fmt: skip
            s.add(device)
        return _device(device)

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        async with self._tx() as s:
            row = await s.get(t.Device, device_id)
            return _device(row) if row is not None else None

    async def get_devices(self, device_ids: Sequence[str]) -> dict[str, DeviceRecord]:
        """The devices enrolled under any of `device_ids`, by id (one query for all)."""
        async with self._tx() as s:
            rows = await s.scalars(select(t.Device).where(t.Device.id.in_(device_ids)))
            return {row.id: _device(row) for row in rows}

    async def list_devices(self) -> list[DeviceRecord]:
        async with self._tx() as s:
            rows = (await s.scalars(select(t.Device).order_by(t.Device.created_at))).all()
            return [_device(r) for r in rows]

    async def revoke_device(self, device_id: str) -> bool:
        async with self._tx() as s:
            result = await s.execute(
                update(t.Device)
                .where(t.Device.id == device_id, t.Device.revoked_at.is_(None))
                .values(revoked_at=_now())
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    # --- interactions ---------------------------------------------------------------------

    async def record_interaction(self, it: NewInteraction) -> None:
        await self.record_interactions([it])

    async def record_interactions(
        self, batch: list[NewInteraction], sessions: list[SessionEvent] | None = None
    ) -> None:
        """Store many interactions and session events in one transaction (the server writes
        them in batches: one commit, and one fsync, for hundreds of records)."""
        sessions = sessions or []
        if not batch and not sessions:
            return
        now = _now()
        rows = [
            {
                "device_id": it.device_id,
                "request_id": it.request_id,
                "session_id": it.session_id,
                "created_at": now,
                "prompt": {"messages": it.messages, "placeholders": it.placeholders},
                "answer": it.answer,
                "status": it.status,
                "error_name": it.error_name,
                "intent": it.intent,
                "route_reasons": list(it.route_reasons),
                "priority": it.priority,
                "latency_ms": it.latency_ms,
                "prompt_tokens": it.prompt_tokens,
                "completion_tokens": it.completion_tokens,
                "backend": it.backend,
                "model": it.model,
                "fact_ids": list(it.fact_ids),
            }
            for it in batch
        ]
        started = [e for e in sessions if e.kind == "started"]
        ended = [e for e in sessions if e.kind == "ended"]
        # The insert's parameters are built here, on the event loop: the writing thread then
        # holds the GIL only briefly.
        inserts = (
            self._sqlite_interactions.statements(rows)
            if self._sqlite_interactions is not None
            else None
        )

        def write(s: Session) -> None:
            if started:
                s.execute(
                    insert(t.Session),
                    [{"id": e.session_id, "device_id": e.device_id, "server_id": e.server_id or "",
                      "started_at": e.at} for e in started],
                )  # fmt: skip
                s.execute(
                    update(t.Device),
                    [{"id": e.device_id, "last_seen_at": e.at, "adapter_version": e.adapter_version,
                      "base_model_sha256": e.base_model_sha256} for e in started],
                )  # fmt: skip
            if inserts is not None:
                connection = s.connection()
                for sql, params in inserts:
                    connection.exec_driver_sql(sql, params)
            elif rows:
                # PostgreSQL (asyncpg: no worker thread, no GIL hand-overs): a Core insert on
                # the table; the ORM's bulk path costs a fifth more per row.
                s.execute(insert(t.INTERACTIONS), rows)
            if ended:
                s.execute(
                    update(t.Session),
                    [{"id": e.session_id, "ended_at": e.at, "close_code": e.close_code}
                     for e in ended],
                )  # fmt: skip

        if self._log is not None:
            await self._log.write(write)
        else:
            async with self._tx() as session:
                await session.run_sync(write)

    async def list_interactions(
        self,
        *,
        limit: int = 100,
        device_id: str | None = None,
        status: str | None = None,
        request_id: str | None = None,
        rated_only: bool = False,
        rated_since: datetime | None = None,
        before_id: int | None = None,
        keys: Collection[tuple[str, str]] | None = None,
    ) -> list[InteractionRecord]:
        """Newest first, each with the latest feedback on it (if any); `rated_only` keeps those
        that have feedback, `rated_since` those with feedback stored since then. `before_id`
        pages back: the interactions older than the one with that id (the last `id` of the
        previous page). `keys` keeps those with these (device id, request id) pairs."""
        async with self._tx() as s:
            query = select(t.Interaction).order_by(t.Interaction.id.desc()).limit(limit)
            if before_id is not None:
                query = query.where(t.Interaction.id < before_id)
            if device_id is not None:
                query = query.where(t.Interaction.device_id == device_id)
            if status is not None:
                query = query.where(t.Interaction.status == status)
            if request_id is not None:
                query = query.where(t.Interaction.request_id == request_id)
            if keys is not None:
                pair = tuple_(t.Interaction.device_id, t.Interaction.request_id)
                query = query.where(pair.in_(list(keys)))
            if rated_only or rated_since is not None:
                feedback = select(t.Feedback.request_id).where(
                    t.Feedback.device_id == t.Interaction.device_id,
                    t.Feedback.request_id == t.Interaction.request_id,
                )
                if rated_since is not None:
                    feedback = feedback.where(t.Feedback.created_at >= rated_since)
                query = query.where(feedback.exists())
            rows = (await s.scalars(query)).all()
            # The feedback on those rows, joined against the same query rather than listed by
            # id: a list of tens of thousands of ids exceeds the drivers' parameter limits.
            page = query.with_only_columns(
                t.Interaction.device_id, t.Interaction.request_id
            ).subquery()
            fb_rows = (
                await s.scalars(
                    select(t.Feedback)
                    .join(
                        page,
                        (t.Feedback.device_id == page.c.device_id)
                        & (t.Feedback.request_id == page.c.request_id),
                    )
                    .order_by(t.Feedback.created_at)
                )
            ).all()
            ratings = {(f.device_id, f.request_id): f for f in fb_rows}
            out = []
            for r in rows:
                fb = ratings.get((r.device_id, r.request_id))
                out.append(
                    InteractionRecord(
                        id=r.id,
                        device_id=r.device_id,
                        request_id=r.request_id,
                        created_at=r.created_at,
                        messages=list(r.prompt.get("messages", [])),
                        placeholders=list(r.prompt.get("placeholders", [])),
                        answer=r.answer,
                        status=r.status,
                        error_name=r.error_name,
                        intent=r.intent,
                        route_reasons=list(r.route_reasons),
                        latency_ms=r.latency_ms,
                        prompt_tokens=r.prompt_tokens,
                        completion_tokens=r.completion_tokens,
                        backend=r.backend,
                        model=r.model,
                        fact_ids=list(r.fact_ids),
                        rating=fb.rating if fb else None,
                        correction=fb.correction if fb else None,
                    )
                )
            return out

    # --- idempotent messages: stored once per (device, key), acknowledged after commit ----

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
        now = _now()
        rows = [
            {"device_id": f.device_id, "idempotency_key": f.idempotency_key,
             "request_id": f.request_id, "rating": f.rating, "correction": f.correction,
             "created_at": now, "adapter_version": f.adapter_version}
            for f in items
        ]  # fmt: skip
        return dict(zip(items, await self._insert_once(t.Feedback, rows), strict=True))

    async def add_report(self, item: NewReport) -> bool:
        """Store one device report; True if its key was stored before (a resend)."""
        return (await self.add_report_batch([item]))[item]

    async def add_report_batch(self, items: Sequence[NewReport]) -> dict[NewReport, bool]:
        """Store many device reports in one transaction, like `add_feedback_batch`."""
        now = _now()
        rows = [
            {"device_id": r.device_id, "idempotency_key": r.idempotency_key, "body": r.body,
             "created_at": now, "period_start": r.period_start, "period_end": r.period_end,
             "adapter_version": r.adapter_version, "local": r.routes.local,
             "cloud": r.routes.cloud, "local_only": r.routes.local_only,
             "local_fallback": r.routes.local_fallback}
            for r in items
        ]  # fmt: skip

        async def reasons(s: AsyncSession, stored: list[dict[str, Any]]) -> None:
            rows = [
                {"device_id": r["device_id"], "idempotency_key": r["idempotency_key"],
                 "reason": reason, "count": count, "period_end": r["period_end"],
                 "created_at": now}
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
        now = _now()
        rows = [
            {"device_id": u.device_id, "idempotency_key": u.idempotency_key,
             "version": u.version, "status": u.status, "created_at": now}
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
                            reason=u.reason, self_check=dict(u.self_check), updated_at=now,
                        )
                    )  # fmt: skip

        return dict(zip(items, await self._insert_once(t.StatusReport, rows, deploy), strict=True))

    async def count_training_candidates(self, since: datetime | None = None) -> int:
        """Answered escalations that could teach the next adapter, new since `since`: answers
        quoted from a knowledge fact logged since then, and answers rated up or corrected
        since then: what the distillation dataset trusts, before it leaves out duplicates and
        follow-ups."""
        i, f = t.Interaction, t.Feedback
        rated = select(f.request_id).where(
            f.device_id == i.device_id,
            f.request_id == i.request_id,
            or_(f.rating == "positive", f.correction.is_not(None)),
        )
        quoted = i.backend == "knowledge"
        if since is not None:
            rated = rated.where(f.created_at >= since)
            quoted = and_(quoted, i.created_at >= since)
        query = (
            select(func.count()).select_from(i).where(i.status == "ok", or_(quoted, rated.exists()))
        )
        async with self._tx() as s:
            return int(await s.scalar(query) or 0)

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

    # --- adapters and deployments -----------------------------------------------------------

    async def list_adapters(self) -> list[dict[str, Any]]:
        """Published adapter bundles, newest first (the closed loop writes them)."""
        async with self._tx() as s:
            rows = (await s.scalars(select(t.Adapter).order_by(t.Adapter.version.desc()))).all()
            return [
                {
                    "version": r.version,
                    "name": r.name,
                    "base_model_sha256": r.base_model_sha256,
                    "created_at": r.created_at.isoformat(),
                    "metrics": dict(r.metrics),
                }
                for r in rows
            ]

    async def deployment_summary(self) -> list[dict[str, Any]]:
        """Per adapter version, how many devices report each deployment status."""
        async with self._tx() as s:
            rows = (
                await s.execute(
                    select(t.Deployment.version, t.Deployment.status, func.count())
                    .group_by(t.Deployment.version, t.Deployment.status)
                    .order_by(t.Deployment.version.desc())
                )
            ).all()
        summary: dict[int, dict[str, int]] = {}
        for version, status, count in rows:
            summary.setdefault(version, {})[status] = count
        return [{"version": v, "devices": c} for v, c in summary.items()]

    # --- retention ------------------------------------------------------------------------

    async def purge(self, before: datetime, *, chunk: int = 5000) -> dict[str, int]:
        """Delete what was recorded before `before`: interactions, feedback, device reports,
        privacy events, ended sessions and expired enrollment tokens. Devices (and their
        privacy violation counts), adapters, rollouts and jobs stay. Returns the rows deleted
        per table.

        Interactions go in chunks of `chunk` rows, one transaction each, so a large purge
        never holds SQLite's write lock for long."""
        counts = {"interactions": 0}
        while True:
            async with self._tx() as s:
                old = (
                    select(t.Interaction.id)
                    .where(t.Interaction.created_at < before)
                    .order_by(t.Interaction.id)
                    .limit(chunk)
                )
                result = await s.execute(delete(t.Interaction).where(t.Interaction.id.in_(old)))
            deleted = int(result.rowcount)  # type: ignore[attr-defined]
            counts["interactions"] += deleted
            if deleted < chunk:
                break
        async with self._tx() as s:
            for name, statement in (
                ("feedback", delete(t.Feedback).where(t.Feedback.created_at < before)),
                # A report's reasons first: they refer to it.
                (
                    "report_reasons",
                    delete(t.ReportReason).where(t.ReportReason.created_at < before),
                ),
                ("reports", delete(t.Report).where(t.Report.created_at < before)),
                (
                    "privacy_events",
                    delete(t.PrivacyEvent).where(t.PrivacyEvent.created_at < before),
                ),
                ("sessions", delete(t.Session).where(t.Session.ended_at < before)),
                (
                    "enrollment_tokens",
                    delete(t.EnrollmentToken).where(t.EnrollmentToken.expires_at < before),
                ),
            ):
                result = await s.execute(statement)
                counts[name] = int(result.rowcount)  # type: ignore[attr-defined]
        return counts

    # --- privacy --------------------------------------------------------------------------

    async def record_privacy_event(self, device_id: str, request_id: str, kinds: list[str]) -> None:
        """Count raw personal data seen from a device. Only the kinds are stored."""
        async with self._tx() as s:
            s.add(
                t.PrivacyEvent(
                    device_id=device_id, request_id=request_id, kinds=sorted(set(kinds)),
                    created_at=_now(),
                )
            )  # fmt: skip
            await s.execute(
                update(t.Device)
                .where(t.Device.id == device_id)
                .values(privacy_violations=t.Device.privacy_violations + 1)
            )

    async def privacy_event_count(self) -> int:
        async with self._tx() as s:
            return int(await s.scalar(select(func.count()).select_from(t.PrivacyEvent)) or 0)


class _SqliteBatchInsert:
    """Many rows into one SQLite table as a few multi-row ``INSERT ... VALUES (...), (...)``
    statements, driver-level.

    SQLite runs on a thread beside the event loop (`_SqliteLog`), and Python's sqlite3 releases
    the GIL around every row an executemany steps through; with the event loop busy on the
    other side, each of those hand-overs costs more than the insert itself (the interaction log
    took a third of the server's CPU per request in `bench/cloud_roundtrip.py`). One statement
    per chunk hands the GIL over once per chunk. Chunks have power-of-two sizes, so a handful of
    statement texts cover every batch and stay in sqlite3's statement cache. Values are bound as
    the dialect's own bind processors would bind them (JSON columns as JSON text)."""

    def __init__(self, table: Table, dialect: Dialect, max_variables: int) -> None:
        columns = [c for c in table.columns if not c.primary_key]
        quote = dialect.identifier_preparer.quote
        head = (
            f"INSERT INTO {quote(table.name)} ({', '.join(quote(c.name) for c in columns)}) VALUES "
        )
        row = "(" + ", ".join("?" * len(columns)) + ")"
        self.fields = [
            (c.key, c.type.dialect_impl(dialect).bind_processor(dialect)) for c in columns
        ]
        """Each column's row key and how its value is bound (None: as it is)."""
        self.chunk = 1
        while self.chunk * 2 * len(columns) <= max_variables and self.chunk < 256:
            self.chunk *= 2
        """Most rows per statement: a power of two, within SQLite's limit on parameters."""
        self._sql = {2**k: head + ", ".join([row] * 2**k) for k in range(self.chunk.bit_length())}

    @classmethod
    def for_dialect(cls, table: Table, dialect: Dialect) -> _SqliteBatchInsert:
        # Up to 999 parameters per statement before SQLite 3.32, 32766 since.
        version = getattr(dialect.dbapi, "sqlite_version_info", (3, 32, 0))
        return cls(table, dialect, 32766 if version >= (3, 32, 0) else 999)

    def statements(self, rows: list[dict[str, Any]]) -> list[tuple[str, tuple[Any, ...]]]:
        """The statements, with their parameters, that insert `rows` in order."""
        out = []
        start = 0
        while start < len(rows):
            size = self.chunk
            while size > len(rows) - start:
                size //= 2
            chunk = rows[start : start + size]
            # Column by column, then interleaved row by row: a few comprehensions per chunk
            # rather than a Python step per value.
            columns = [_bound(key, convert, chunk) for key, convert in self.fields]
            out.append(
                (self._sql[size], tuple(itertools.chain.from_iterable(zip(*columns, strict=True))))
            )
            start += size
        return out


class _SqliteLog:
    """Writes the interaction log's batches to a SQLite file: each batch's whole transaction in
    one call to a thread of its own, over a synchronous connection to the same file.

    Through aiosqlite a batch took five trips to its worker thread (cursor, execute, close,
    commit, and the pool's rollback), and in each trip the worker and the busy event loop hand
    the GIL back and forth: in `bench.cloud_roundtrip`, 0.46 voluntary context switches per
    round trip. With one trip per batch, about half as many."""

    def __init__(self, url: URL, lock_timeout_s: float) -> None:
        self._engine = create_engine(
            url.set(drivername="sqlite"),
            json_serializer=_to_json,
            connect_args={"timeout": lock_timeout_s, "check_same_thread": False},
        )
        _set_sqlite_pragmas_on_connect(self._engine, lock_timeout_s)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeloop-log")

    async def write(self, work: Callable[[Session], None]) -> None:
        """Run `work` in one transaction on the log's thread."""
        await asyncio.get_running_loop().run_in_executor(self._thread, self._run, work)

    def _run(self, work: Callable[[Session], None]) -> None:
        with _mapped_errors(), Session(self._engine) as session, session.begin():
            work(session)

    async def close(self) -> None:
        """Wait for a batch being written, then close the connection."""
        await asyncio.to_thread(self._thread.shutdown)
        self._engine.dispose()


@contextmanager
def _mapped_errors() -> Iterator[None]:
    """Database errors leave as `StoreUnavailable` (retryable) or `StoreError`."""
    try:
        yield
    except (EnrollmentRefused, IntegrityError):
        raise
    except (OperationalError, DBAPIError, OSError, ConnectionError) as exc:
        raise StoreUnavailable(f"database unavailable: {type(exc).__name__}") from exc
    except SQLAlchemyError as exc:
        raise StoreError(f"database error: {type(exc).__name__}") from exc


def _bound(key: str, convert: Callable[[Any], Any] | None, rows: list[dict[str, Any]]) -> list[Any]:
    """Column `key` of `rows`, converted for binding. Rows of a batch share some values (its
    timestamp): each object is converted once."""
    values = [row[key] for row in rows]
    if convert is None:
        return values
    seen: dict[int, Any] = {}
    for i, value in enumerate(values):
        bound = seen.get(id(value), _MISSING)
        if bound is _MISSING:
            bound = seen[id(value)] = convert(value)
        values[i] = bound
    return values


_MISSING = object()


def _to_json(value: Any) -> str:
    return pydantic_core.to_json(value).decode()


def _set_sqlite_pragmas_on_connect(engine: Engine, lock_timeout_s: float) -> None:
    busy_ms = int(lock_timeout_s * 1000)
    event.listen(engine, "connect", lambda conn, _: _sqlite_pragmas(conn, busy_ms))


def _sqlite_pragmas(dbapi_conn: Any, busy_ms: int) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
    cursor.close()
