"""`BatchedLookup`: lookups by key from many tasks at once, answered by one query per batch.

When thousands of devices connect at once (the cloud restarted, a shop's network came back),
each authentication looks up its device and the bundle it should be offered. One query per
connection costs the event loop about a millisecond of ORM and driver work each, which caps a
reconnecting fleet at a couple of hundred devices a second. Batched, the keys asked for while
one query runs go together in the next: a lone lookup still runs at once, a crowd shares a query
per batch.

Every caller is answered by a query that started after it asked, so a batched lookup is exactly
as fresh as its own query would have been (a device revoked before it asked is seen revoked).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

__all__ = ["BatchedLookup"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Batch(Generic[K, V]):
    __slots__ = ("keys", "task")

    def __init__(self) -> None:
        self.keys: dict[K, None] = {}
        self.task: asyncio.Task[Mapping[K, V]] | None = None


class BatchedLookup(Generic[K, V]):
    """Calls `fetch(keys)` for batches of the keys passed to `get`; batches run one at a time,
    in order, at most `max_batch` keys each. `fetch` returns what it found by key; a key it
    leaves out is answered with None. An error from `fetch` is raised to every caller of that
    batch."""

    def __init__(
        self, fetch: Callable[[list[K]], Awaitable[Mapping[K, V]]], *, max_batch: int = 500
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._fetch = fetch
        self.max_batch = max_batch
        self.fetches = 0
        """Queries run so far."""
        self._open: _Batch[K, V] | None = None
        self._last: asyncio.Task[Mapping[K, V]] | None = None

    async def get(self, key: K) -> V | None:
        batch = self._open
        if batch is None or len(batch.keys) >= self.max_batch:
            batch = self._open = _Batch()
            batch.task = asyncio.create_task(self._run(batch, self._last))
            batch.task.add_done_callback(_retrieve)
            self._last = batch.task
        batch.keys[key] = None
        assert batch.task is not None
        # Shielded: a caller that gives up (its connection closed) does not cancel the query
        # the others are waiting for.
        found = await asyncio.shield(batch.task)
        return found.get(key)

    async def _run(
        self, batch: _Batch[K, V], previous: asyncio.Task[Mapping[K, V]] | None
    ) -> Mapping[K, V]:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        if self._open is batch:
            self._open = None  # from here on, callers join the next batch
        self.fetches += 1
        return await self._fetch(list(batch.keys))


def _retrieve(task: asyncio.Task[object]) -> None:
    # Every caller may have gone by the time a query fails: mark its error seen so asyncio does
    # not report it as never retrieved.
    if not task.cancelled():
        task.exception()
