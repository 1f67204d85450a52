"""`Inbox`: the server's counterpart of the edge `Outbox`. It stores what a device sends with
an idempotency key (feedback, reports, update statuses), each once, and acknowledges it only
after the commit that holds it; then it lets the agent learn from ratings and the rollout
policy review what devices report.

Messages arriving together share commits (`Batcher`): from many devices at once, and from one
device sending in a row, as an outbox does after an outage. Feedback and reports run beside the
connection's next frames for that, at most `MAX_PENDING` at once per connection; update
statuses run in order, since each may change the adapter version the connection runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict
from typing import Any, Protocol

from cloud_agent.agent import CloudAgent
from cloud_agent.batching import Batcher
from cloud_agent.distribution import BundleDistribution
from cloud_agent.errors import StoreError
from cloud_agent.metrics import Metrics
from cloud_agent.recorder import InteractionRecorder
from cloud_agent.store import (
    InteractionRecord,
    NewFeedback,
    NewReport,
    NewUpdateStatus,
    RouteCounts,
    Store,
)
from protocol import Ack, Feedback, Report, ServerSession, UpdateStatus

__all__ = ["MAX_PENDING", "Inbox", "Sender"]

log = logging.getLogger("edgeloop.cloud.inbox")

MAX_PENDING = 64
"""Messages one connection may have being stored at once (an outbox sends up to 100 in a row)."""


class Sender(Protocol):
    """What the inbox needs to know of one authenticated connection."""

    session: ServerSession
    device_id: str | None
    adapter_version: int | None
    acks: set[asyncio.Task[None]]
    """Messages of this connection being stored and acknowledged."""


class Inbox:
    def __init__(
        self,
        store: Store,
        *,
        metrics: Metrics,
        recorder: InteractionRecorder,
        agent: CloudAgent,
        updates: BundleDistribution,
        flush: Callable[[Any], Awaitable[None]],
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.recorder = recorder
        self.agent = agent
        self.updates = updates
        self._flush = flush
        """Sends what a connection's session has queued (the server's one writer)."""
        sizes = metrics.store_batch
        # Each calls `self.store` when it runs: the store is looked up late, not captured.
        self._feedback = Batcher[NewFeedback, bool](
            lambda items: self.store.add_feedback_batch(items),
            observe=sizes.labels("feedback").observe,
        )
        self._reports = Batcher[NewReport, bool](
            lambda items: self.store.add_report_batch(items),
            observe=sizes.labels("reports").observe,
        )
        self._statuses = Batcher[NewUpdateStatus, bool](
            lambda items: self.store.add_update_status_batch(items),
            observe=sizes.labels("update_statuses").observe,
        )
        self._answers = Batcher[tuple[str, str], InteractionRecord](
            self._find_answers, observe=sizes.labels("rated_answers").observe
        )

    async def feedback(self, conn: Sender, fb: Feedback) -> None:
        await self._beside(conn, self._take_feedback(conn, fb))

    async def report(self, conn: Sender, rp: Report) -> None:
        await self._beside(conn, self._take_report(conn, rp))

    async def update_status(self, conn: Sender, us: UpdateStatus) -> None:
        await self._acknowledge(
            conn,
            "update_status",
            us.idempotency_key,
            lambda device: self._statuses.submit(
                NewUpdateStatus(device, us.idempotency_key, us.version, us.status, us.reason,
                                us.self_check)
            ),
        )  # fmt: skip
        if us.status == "applied":
            conn.adapter_version = us.version
        await self.updates.review(us.version)

    async def drain(self) -> None:
        """Wait for the batches already asked for (before the store closes)."""
        for batcher in (self._feedback, self._reports, self._statuses, self._answers):
            await batcher.drain()

    async def _beside(self, conn: Sender, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` beside the connection's next frames; past `MAX_PENDING` at once, the
        connection waits (its next frames stay unread)."""
        while len(conn.acks) >= MAX_PENDING:
            await asyncio.wait(conn.acks, return_when=asyncio.FIRST_COMPLETED)

        async def run() -> None:
            await work
            await self._flush(conn)  # the ack, and whatever else it queued

        task = asyncio.create_task(run())
        conn.acks.add(task)
        task.add_done_callback(conn.acks.discard)
        task.add_done_callback(_log_failure)

    async def _take_feedback(self, conn: Sender, fb: Feedback) -> None:
        await self._acknowledge(
            conn,
            "feedback",
            fb.idempotency_key,
            lambda device: self._feedback.submit(
                NewFeedback(device, fb.idempotency_key, fb.request_id, fb.rating,
                            fb.correction, fb.adapter_version)
            ),
        )  # fmt: skip
        if fb.adapter_version is not None:
            await self.updates.review(fb.adapter_version)
        if fb.rating == "positive" or fb.correction:
            await self._learn(conn, fb.request_id)

    async def _take_report(self, conn: Sender, rp: Report) -> None:
        routes = RouteCounts(**rp.routes.model_dump())

        def write(device: str) -> Awaitable[bool | None]:
            body = rp.model_dump(mode="json", exclude={"type", "idempotency_key"})
            return self._reports.submit(
                NewReport(device, rp.idempotency_key, body, rp.period_start, rp.period_end,
                          routes, rp.adapter_version)
            )  # fmt: skip

        if await self._acknowledge(conn, "report", rp.idempotency_key, write):
            for route, count in asdict(routes).items():
                self.metrics.device_requests.labels(route).inc(count)

    async def _acknowledge(
        self,
        conn: Sender,
        kind: str,
        key: str,
        write: Callable[[str], Awaitable[bool | None]],
    ) -> bool:
        """Store a message, then ack it; `write` returns whether its key was stored before.
        Returns whether this call stored it (not a resend, and the store took it)."""
        assert conn.device_id is not None
        try:
            duplicate = bool(await write(conn.device_id))
        except StoreError:
            # No ack: the device keeps the message and resends it; nothing is lost.
            log.warning("store unavailable; %s %s not acknowledged", kind, key)
            return False
        self.metrics.acks.labels(kind, str(duplicate).lower()).inc()
        if conn.session.is_open:
            conn.session.send(Ack(idempotency_key=key, duplicate=duplicate))
        return not duplicate

    async def _learn(self, conn: Sender, request_id: str) -> None:
        """Let the agent learn from feedback on one of its answers (best effort)."""
        assert conn.device_id is not None
        if self.recorder.holds(conn.device_id, request_id):
            await self.recorder.flush()  # the answer is still in the write batch
        try:
            found = await self._answers.submit((conn.device_id, request_id))
        except StoreError:
            return
        if found is not None and await self.agent.learn(found):
            self.metrics.learned.inc()

    async def _find_answers(
        self, keys: list[tuple[str, str]]
    ) -> dict[tuple[str, str], InteractionRecord]:
        found = await self.store.list_interactions(keys=keys, limit=len(keys))
        return {(r.device_id, r.request_id): r for r in found}


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("storing a message failed", exc_info=exc)
