"""Unified online/offline scheduling in front of the backends.

Every backend call takes a slot from the `Scheduler`. There are `capacity` slots (how many
calls the backends serve well at once).

- **Online** requests (a user is waiting) carry a deadline. They are served earliest deadline
  first and always before offline work. A request that cannot start in time is refused at once
  with `Overloaded` (the device then answers locally) rather than left to queue: the expected
  wait is estimated from the queue ahead of it and the measured service time.
- **Offline** work (batch answering, relabelling, evaluation) only fills idle capacity. It may
  hold at most ``capacity - reserve - online_in_flight`` slots, so it shrinks as online load
  rises and pauses while online requests queue; it resumes by itself and is never dropped.

Load (slots in use, queue depths, queue wait, service time) is exposed by `load()`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from cloud_agent.errors import Overloaded

__all__ = ["Load", "Scheduler"]

Lane = Literal["online", "offline"]


@dataclass(frozen=True, slots=True)
class Load:
    capacity: int
    online_in_flight: int
    offline_in_flight: int
    online_queued: int
    offline_queued: int
    service_s: float
    """Exponentially weighted mean time a slot is held."""
    online_wait_s: float
    """Exponentially weighted mean time online requests waited for a slot."""
    refused: int
    """Online requests refused as overloaded since start."""


class _Ewma:
    __slots__ = ("alpha", "value", "seen")

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha, self.value, self.seen = alpha, 0.0, False

    def add(self, sample: float) -> None:
        self.value = (
            sample if not self.seen else self.alpha * sample + (1 - self.alpha) * self.value
        )
        self.seen = True


class Scheduler:
    """Hands out backend slots: online first by deadline, offline in the gaps."""

    def __init__(
        self,
        capacity: int,
        *,
        reserve: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        # Slots offline work leaves free for online arrivals; with one slot, offline work may
        # still use it when nothing online is running or waiting.
        self.reserve = reserve if reserve is not None else max(0, capacity // 4)
        self._clock = clock
        self._online_in_flight = 0
        self._offline_in_flight = 0
        self._online: list[tuple[float, int, asyncio.Future[None]]] = []
        self._offline: deque[asyncio.Future[None]] = deque()
        self._seq = itertools.count()
        self._service = _Ewma()
        self._wait = _Ewma()
        self._refused = 0

    # --- public API -----------------------------------------------------------------------

    @asynccontextmanager
    async def slot(self, lane: Lane, *, deadline: float | None = None) -> AsyncIterator[None]:
        """Hold one backend slot for the body. `deadline` (clock seconds) is for online work."""
        if lane == "online":
            if deadline is None:
                raise ValueError("online work needs a deadline")
            await self._acquire_online(deadline)
        else:
            await self._acquire_offline()
        started = self._clock()
        try:
            yield
        finally:
            self._service.add(self._clock() - started)
            if lane == "online":
                self._online_in_flight -= 1
            else:
                self._offline_in_flight -= 1
            self._dispatch()

    def load(self) -> Load:
        return Load(
            capacity=self.capacity,
            online_in_flight=self._online_in_flight,
            offline_in_flight=self._offline_in_flight,
            online_queued=sum(1 for *_, f in self._online if not f.done()),
            offline_queued=sum(1 for f in self._offline if not f.done()),
            service_s=self._service.value,
            online_wait_s=self._wait.value,
            refused=self._refused,
        )

    def expected_wait(self) -> float:
        """Seconds a new online request would wait for a slot, as estimated now."""
        busy = self._online_in_flight + self._offline_in_flight
        queued = sum(1 for *_, f in self._online if not f.done())
        if busy < self.capacity and queued == 0:
            return 0.0
        # Requests ahead of us drain `capacity` at a time, one service time per round.
        rounds = (queued + 1) / self.capacity
        return rounds * self._service.value

    # --- internals ------------------------------------------------------------------------

    def _online_may_start(self) -> bool:
        return self._online_in_flight + self._offline_in_flight < self.capacity

    def _offline_may_start(self) -> bool:
        if any(not f.done() for *_, f in self._online):
            return False
        limit = self.capacity - self.reserve - self._online_in_flight
        if self.capacity == 1:
            limit = 1 - self._online_in_flight
        busy = self._online_in_flight + self._offline_in_flight
        return self._offline_in_flight < limit and busy < self.capacity

    async def _acquire_online(self, deadline: float) -> None:
        now = self._clock()
        expected = self.expected_wait() + self._service.value
        if now + expected > deadline:
            self._refused += 1
            raise Overloaded(
                f"expected start in {expected:.3f}s exceeds the deadline in {deadline - now:.3f}s"
            )
        if self._online_may_start() and not self._online:
            self._online_in_flight += 1
            self._wait.add(0.0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._online, (deadline, next(self._seq), future))
        try:
            # Give up when even an immediate start could no longer finish in time.
            budget = max(0.0, deadline - self._clock() - self._service.value)
            await asyncio.wait_for(asyncio.shield(future), timeout=budget)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if future.done() and not future.cancelled():
                # Granted in the same instant: hand the slot back.
                self._online_in_flight -= 1
                self._dispatch()
            future.cancel()
            if isinstance(exc, TimeoutError):
                self._refused += 1
                raise Overloaded("no slot freed before the deadline") from None
            raise
        self._wait.add(self._clock() - now)

    async def _acquire_offline(self) -> None:
        if self._offline_may_start() and not self._offline:
            self._offline_in_flight += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._offline.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._offline_in_flight -= 1
                self._dispatch()
            raise

    def _dispatch(self) -> None:
        while self._online and self._online_may_start():
            _, _, future = heapq.heappop(self._online)
            if not future.done():
                self._online_in_flight += 1
                future.set_result(None)
        while self._offline and self._offline_may_start():
            future = self._offline.popleft()
            if not future.done():
                self._offline_in_flight += 1
                future.set_result(None)
