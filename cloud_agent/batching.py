"""`Batcher`: calls by key from many tasks at once, done as one store transaction per batch.

When thousands of devices connect at once (the cloud restarted, a shop's network came back),
each authentication looks up its device and the bundle it should be offered, and each device
then resends the feedback its outbox kept. One transaction per message costs the event loop
about a millisecond of ORM and driver work (and a write, a commit), which caps a reconnecting
fleet at a few hundred messages a second. Batched, the keys submitted while one transaction
runs go together in the next: a lone call still runs at once, a crowd shares a transaction.

Every caller is answered by a transaction that started after it submitted its key: a lookup is
as fresh as its own query would have been (a device revoked before it asked is seen revoked),
and a write is acknowledged only once the transaction holding it has committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

__all__ = ["Batcher"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Batch(Generic[K, V]):
    __slots__ = ("keys", "task")

    def __init__(self) -> None:
        self.keys: dict[K, None] = {}
        self.task: asyncio.Task[Mapping[K, V]] | None = None


class Batcher(Generic[K, V]):
    """Calls `run(keys)` for batches of the keys passed to `submit`; batches run one at a
    time, in order, at most `max_batch` keys each. `run` returns a result by key; a key it
    leaves out is answered with None. An error from `run` is raised to every caller of that
    batch. Equal keys submitted to one batch are run once and share the result."""

    def __init__(
        self,
        run: Callable[[list[K]], Awaitable[Mapping[K, V]]],
        *,
        max_batch: int = 500,
        observe: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._call = run
        self.max_batch = max_batch
        self._observe = observe
        """Told the size of each batch as it runs (a metric)."""
        self.batches = 0
        """Batches run so far."""
        self._open: _Batch[K, V] | None = None
        self._last: asyncio.Task[Mapping[K, V]] | None = None

    async def submit(self, key: K) -> V | None:
        batch = self._open
        if batch is None or len(batch.keys) >= self.max_batch:
            batch = self._open = _Batch()
            batch.task = asyncio.create_task(self._run(batch, self._last))
            batch.task.add_done_callback(_retrieve)
            self._last = batch.task
        batch.keys[key] = None
        assert batch.task is not None
        # Shielded: a caller that gives up (its connection closed) does not cancel the batch
        # the others are waiting for.
        found = await asyncio.shield(batch.task)
        return found.get(key)

    async def drain(self) -> None:
        """Wait until every batch submitted so far has run (its errors stay with its callers)."""
        last = self._last
        if last is not None and not last.done():
            await asyncio.wait([last])

    async def _run(
        self, batch: _Batch[K, V], previous: asyncio.Task[Mapping[K, V]] | None
    ) -> Mapping[K, V]:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        if self._open is batch:
            self._open = None  # from here on, callers join the next batch
        self.batches += 1
        if self._observe is not None:
            self._observe(len(batch.keys))
        return await self._call(list(batch.keys))


def _retrieve(task: asyncio.Task[object]) -> None:
    # Every caller may have gone by the time a batch fails: mark its error seen so asyncio does
    # not report it as never retrieved.
    if not task.cancelled():
        task.exception()
