"""Unified online/offline scheduling in front of the backends.

Every backend call takes a slot from the `Scheduler`. There are `capacity` slots (how many
calls the backends serve well at once).

- **Online** requests (a user is waiting) carry a deadline. They are served earliest deadline
  first and always before offline work. A request that cannot start in time is refused at once
  with `Overloaded` (the device then answers locally) rather than left to queue: the expected
  wait is estimated from the queue ahead of it and the measured service time.
- **Offline** work (batch answering, relabelling, evaluation) only fills idle capacity. The
  scheduler keeps ``ceil(L + headroom * sqrt(L))`` slots for online work, where ``L`` is the
  online concurrency it measures (arrival rate over the last window times service time, by
  Little's law) and the square root covers Poisson bursts; offline work may use the rest. So
  offline work takes everything when nothing is online, shrinks as online load rises, pauses
  while online requests queue, resumes by itself, and is never dropped.

Load (slots in use, queue depths, queue wait, service time) is exposed by `load()`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from cloud_agent.errors import Overloaded

__all__ = ["Load", "Scheduler", "Slot"]

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
        reserve: int = 0,
        headroom: float = 0.75,
        window_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.reserve = reserve if reserve is not None else (1 if capacity >= 4 else 0)
        """Slots always kept from offline work, whatever the measured online load."""
        self.headroom = headroom
        """Standard deviations of online burst kept free beyond the mean online concurrency."""
        self.window_s = window_s
        self._arrivals: deque[float] = deque()
        self._recheck: asyncio.TimerHandle | None = None
        self._clock = clock
        self._started = clock()
        self._online_in_flight = 0
        self._offline_in_flight = 0
        self._online: list[tuple[float, int, asyncio.Future[None]]] = []
        self._offline: deque[asyncio.Future[None]] = deque()
        self._seq = itertools.count()
        self._service = _Ewma()
        self._wait = _Ewma()
        self._refused = 0

    # --- public API -----------------------------------------------------------------------

    def slot(self, lane: Lane, *, deadline: float | None = None) -> Slot:
        """One backend slot, held for the body of ``async with``. `deadline` (clock seconds) is
        for online work."""
        if lane == "online" and deadline is None:
            raise ValueError("online work needs a deadline")
        return Slot(self, lane, deadline if lane == "online" else None)

    def _release(self, lane: Lane, started: float) -> None:
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

    def online_demand(self) -> float:
        """Mean online concurrency now: arrival rate in the window times service time."""
        now = self._clock()
        while self._arrivals and self._arrivals[0] < now - self.window_s:
            self._arrivals.popleft()
        # Until a whole window has passed, the rate is over the time seen so far.
        span = min(self.window_s, max(now - self._started, self._service.value, 1e-3))
        return len(self._arrivals) / span * self._service.value

    def offline_limit(self) -> int:
        """Slots offline work may hold now."""
        demand = self.online_demand()
        kept = math.ceil(demand + self.headroom * math.sqrt(demand)) if demand > 0 else 0
        kept = max(kept, self.reserve, self._online_in_flight)
        if self.capacity == 1:
            kept = self._online_in_flight  # one slot: offline runs whenever online is idle
        return max(0, self.capacity - kept)

    def _offline_may_start(self) -> bool:
        if any(not f.done() for *_, f in self._online):
            return False
        busy = self._online_in_flight + self._offline_in_flight
        return self._offline_in_flight < self.offline_limit() and busy < self.capacity

    def _take_online(self, deadline: float) -> float | None:
        """Take a free slot at once if one is free and nobody waits for one (most requests:
        nothing to estimate, nothing to await); else the time now, for `_acquire_online`.
        Raises `Overloaded` when even the service time would miss the deadline."""
        now = self._clock()
        arrivals = self._arrivals
        arrivals.append(now)
        # Kept to the window here, not only when offline work asks for the demand: a cloud with
        # no offline work would otherwise keep every arrival since it started.
        while arrivals[0] < now - self.window_s:
            arrivals.popleft()
        if self._online or self._online_in_flight + self._offline_in_flight >= self.capacity:
            return now
        if now + self._service.value > deadline:
            self._refused += 1
            raise Overloaded(
                f"expected start in {self._service.value:.3f}s exceeds the deadline in "
                f"{deadline - now:.3f}s"
            )
        self._online_in_flight += 1
        self._wait.add(0.0)
        return None

    async def _acquire_online(self, deadline: float, now: float) -> None:
        expected = self.expected_wait() + self._service.value
        if now + expected > deadline:
            self._refused += 1
            raise Overloaded(
                f"expected start in {expected:.3f}s exceeds the deadline in {deadline - now:.3f}s"
            )
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
        self._dispatch()  # arms the re-check when the limit keeps it waiting
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
        if self._offline and self._recheck is None:
            # The offline limit also moves with time (the online load measured over the
            # window decays); look again even if no slot is released meanwhile.
            loop = asyncio.get_running_loop()
            self._recheck = loop.call_later(self.window_s / 20, self._recheck_now)

    def _recheck_now(self) -> None:
        self._recheck = None
        self._dispatch()


class Slot:
    """A backend slot from `Scheduler.slot`: taken on entering ``async with`` (waiting, or
    refused with `Overloaded`), given back on leaving. A class rather than a generator-based
    context manager: every backend call goes through one."""

    __slots__ = ("_deadline", "_lane", "_scheduler", "_started")

    def __init__(self, scheduler: Scheduler, lane: Lane, deadline: float | None) -> None:
        """`deadline` is None for offline work, and only for it."""
        self._scheduler = scheduler
        self._lane = lane
        self._deadline = deadline
        self._started = 0.0

    async def __aenter__(self) -> None:
        scheduler = self._scheduler
        if self._deadline is None:
            await scheduler._acquire_offline()
        elif (now := scheduler._take_online(self._deadline)) is not None:
            await scheduler._acquire_online(self._deadline, now)
        self._started = scheduler._clock()

    async def __aexit__(self, *exc_info: object) -> None:
        self._scheduler._release(self._lane, self._started)
