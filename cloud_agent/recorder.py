"""`InteractionRecorder`: writes interactions and session events to the store in batches,
off the request path.

A reply is never delayed by bookkeeping: escalations hand their record to the recorder, which
commits whatever has accumulated in one transaction (at most `max_batch` rows, at least every
`max_delay_s`). The queue is bounded; when it is full, `record` waits, slowing the finished
request's task, never the answer. A failed batch is retried once, then counted as lost; the
interactions are bookkeeping, not acknowledged data (feedback is acked only after its own
commit).
"""

from __future__ import annotations

import asyncio
import logging

from cloud_agent.errors import StoreError
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
    ) -> None:
        self.store = store
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.retry_delay_s = retry_delay_s
        self.lost = 0
        self.written = 0
        self._queue: asyncio.Queue[Record | None] = asyncio.Queue(max_queue)
        self._task: asyncio.Task[None] | None = None
        self._unwritten: set[tuple[str, str]] = set()
        """(device id, request id) of the interactions taken and not yet written or lost."""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="interaction-recorder")

    async def record(self, item: Record) -> None:
        if isinstance(item, NewInteraction):
            self._unwritten.add((item.device_id, item.request_id))
        await self._queue.put(item)

    def holds(self, device_id: str, request_id: str) -> bool:
        """Whether that interaction is still on its way to the store (`flush` to wait)."""
        return (device_id, request_id) in self._unwritten

    async def flush(self) -> None:
        """Wait until everything recorded so far is written (or counted as lost)."""
        await self._queue.join()

    async def stop(self) -> None:
        """Write what is queued, then stop."""
        if self._task is None:
            return
        await self._queue.put(None)
        await self._task
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            batch: list[Record] = []
            taken = 1
            if first is None:
                stopping = True
            else:
                batch.append(first)
            deadline = loop.time() + self.max_delay_s
            while not stopping and len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                try:
                    item = (
                        self._queue.get_nowait()
                        if not self._queue.empty() or timeout <= 0
                        else await asyncio.wait_for(self._queue.get(), timeout)
                    )
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                taken += 1
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
            await self._write(batch)
            for item in batch:
                if isinstance(item, NewInteraction):
                    self._unwritten.discard((item.device_id, item.request_id))
            for _ in range(taken):
                self._queue.task_done()

    async def _write(self, batch: list[Record]) -> None:
        if not batch:
            return
        interactions = [r for r in batch if isinstance(r, NewInteraction)]
        sessions = [r for r in batch if isinstance(r, SessionEvent)]
        for attempt in range(2):
            try:
                await self.store.record_interactions(interactions, sessions)
                self.written += len(batch)
                return
            except StoreError as exc:
                if attempt == 0:
                    log.warning("interaction batch failed (%s); retrying once", exc)
                    await asyncio.sleep(self.retry_delay_s)
        self.lost += len(batch)
        log.error("lost %d records after a retry", len(batch))
