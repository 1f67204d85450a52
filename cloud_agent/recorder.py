"""`InteractionRecorder`: writes interactions and session events to the store in batches,
off the request path.

A reply is never delayed by bookkeeping: escalations hand their record to the recorder, which
commits whatever has accumulated in one transaction (at most `max_batch` rows, at least every
`max_delay_s`). The queue is bounded; when it is full, `record` waits, slowing the finished
request's task, never the answer. A failed batch is retried once, then counted as lost (in
`lost`, and in the `edgeloop_interaction_log_records{outcome="lost"}` metric); the
interactions are bookkeeping, not acknowledged data (feedback is acked only after its own
commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging

from cloud_agent.errors import StoreError
from cloud_agent.metrics import Metrics
from cloud_agent.store import NewInteraction, SessionEvent, Store

Record = NewInteraction | SessionEvent

__all__ = ["InteractionRecorder", "Record"]

log = logging.getLogger("edgeloop.cloud.recorder")


class InteractionRecorder:
    def __init__(
        self,
        store: Store,
        *,
        max_batch: int = 256,
        max_delay_s: float = 0.05,
        max_queue: int = 10_000,
        retry_delay_s: float = 1.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.retry_delay_s = retry_delay_s
        self.lost = 0
        self.written = 0
        # Records wait in a plain list: one timer per batch, not a queue wait per record
        # (taking records one by one from an `asyncio.Queue` with a timeout cost a task and a
        # timer each, a tenth of the server's CPU per escalation in `bench.cloud_roundtrip`).
        self._pending: list[Record] = []
        self._first_at = 0.0
        """Loop time at which the oldest pending record arrived."""
        self._taken = 0
        self._done = 0
        """Records taken by `record`, and those written or counted as lost, since the start."""
        self._wake = asyncio.Event()
        """Set when the writer has something to do now: a first record arrived (so the delay
        starts), a whole batch is waiting (so it need not wait the delay out), or stop."""
        self._progress = asyncio.Condition()
        """Notified after each batch: for `flush`, and for `record` waiting for room."""
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._writing: list[Record] = []
        """The batch being written."""
        self._metrics = metrics
        if metrics is not None:
            metrics.log_pending.set_function(lambda: self.pending)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="interaction-recorder")

    async def record(self, item: Record) -> None:
        if len(self._pending) >= self.max_queue:
            async with self._progress:
                await self._progress.wait_for(lambda: len(self._pending) < self.max_queue)
        if not self._pending:
            self._first_at = asyncio.get_running_loop().time()
            self._wake.set()
        self._pending.append(item)
        self._taken += 1
        if len(self._pending) >= self.max_batch:
            self._wake.set()

    @property
    def pending(self) -> int:
        """Records not written yet: waiting, or in the batch being written."""
        return self._taken - self._done

    def stats(self) -> dict[str, int]:
        """Records waiting, written and lost (for the admin API's load report)."""
        return {"pending": self.pending, "written": self.written, "lost": self.lost}

    def holds(self, device_id: str, request_id: str) -> bool:
        """Whether that interaction is still on its way to the store (`flush` to wait).

        A look through what waits (at most `max_queue`, and usually `max_delay_s` worth)
        rather than a set kept up to date: feedback asks this, once per rating; every
        escalation would pay for the set."""
        return any(
            isinstance(item, NewInteraction)
            and item.request_id == request_id
            and item.device_id == device_id
            for item in itertools.chain(self._writing, self._pending)
        )

    async def flush(self) -> None:
        """Wait until everything recorded so far is written (or counted as lost)."""
        target = self._taken
        async with self._progress:
            await self._progress.wait_for(lambda: self._done >= target)

    async def stop(self) -> None:
        """Write what is waiting, then stop."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        await self._task
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            wait = self._first_at + self.max_delay_s - loop.time()
            if len(self._pending) < self.max_batch and wait > 0 and not self._stopping:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            self._first_at = loop.time()
            self._writing = batch
            await self._write(batch)
            self._writing = []
            # With no await since `_write` counted the batch written or lost, so `pending`
            # never shows a record twice or not at all.
            self._done += len(batch)
            async with self._progress:
                self._progress.notify_all()

    async def _write(self, batch: list[Record]) -> None:
        if not batch:
            return
        interactions = [r for r in batch if isinstance(r, NewInteraction)]
        sessions = [r for r in batch if isinstance(r, SessionEvent)]
        for attempt in range(2):
            try:
                await self.store.record_interactions(interactions, sessions)
                self.written += len(batch)
                if self._metrics is not None:
                    self._metrics.log_records.labels("written").inc(len(batch))
                return
            except StoreError as exc:
                if attempt == 0:
                    log.warning("interaction batch failed (%s); retrying once", exc)
                    await asyncio.sleep(self.retry_delay_s)
            except Exception:
                # A bug, not an outage: retrying will not help, and the recorder must go on
                # (a dead recorder would leave every later record waiting for room).
                log.exception("interaction batch failed")
                break
        self.lost += len(batch)
        if self._metrics is not None:
            self._metrics.log_records.labels("lost").inc(len(batch))
        log.error("lost %d records after a retry", len(batch))
