"""`BackendPool`: several backends behind the same interface, chosen by current load.

Each request goes to the healthy member with the fewest requests in flight (ties: the one used
least recently). A member that fails `max_failures` times in a row with a retryable error is
taken out of rotation; after `cooldown_s` it is probed with a one-token request and readmitted
when that succeeds. A request that fails on one member before producing text is retried on
another. When every member is out, the pool raises `BackendUnavailable` at once. Each
completion names the member that produced it (`Completion.backend`), for the interaction log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from cloud_agent.backends.base import ChatRequest, ChatTurn, Completion, LLMBackend, StreamItem
from cloud_agent.errors import BackendError, BackendUnavailable

__all__ = ["BackendPool", "MemberState"]

_PROBE = ChatRequest(messages=(ChatTurn("user", "ping"),), max_tokens=1)


@dataclass
class MemberState:
    backend: LLMBackend
    in_flight: int = 0
    failures: int = 0
    healthy: bool = True
    down_since: float = 0.0
    last_used: float = 0.0
    served: int = 0
    latency_ewma_s: float = 0.0
    probing: bool = field(default=False, repr=False)


class BackendPool:
    """A load-aware, self-healing set of backends."""

    def __init__(
        self,
        backends: Sequence[LLMBackend],
        *,
        max_failures: int = 3,
        cooldown_s: float = 10.0,
        probe_timeout_s: float = 30.0,
    ) -> None:
        if not backends:
            raise ValueError("a pool needs at least one backend")
        self.members = [MemberState(b) for b in backends]
        self.max_failures = max_failures
        self.cooldown_s = cooldown_s
        self.probe_timeout_s = probe_timeout_s
        self.name = "pool:" + ",".join(b.name for b in backends)
        self._clock = time.monotonic
        self._probes: set[asyncio.Task[None]] = set()

    # --- selection and health -------------------------------------------------------------

    def _pick(self, exclude: set[int]) -> MemberState:
        self._maybe_probe()
        candidates = [m for i, m in enumerate(self.members) if m.healthy and i not in exclude]
        if not candidates:
            raise BackendUnavailable("no healthy backend in the pool")
        return min(candidates, key=lambda m: (m.in_flight, m.last_used))

    def _maybe_probe(self) -> None:
        now = self._clock()
        for member in self.members:
            if (
                not member.healthy
                and not member.probing
                and now - member.down_since >= self.cooldown_s
            ):
                member.probing = True
                task = asyncio.get_running_loop().create_task(self._probe(member))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)

    async def _probe(self, member: MemberState) -> None:
        try:
            await asyncio.wait_for(member.backend.complete(_PROBE), timeout=self.probe_timeout_s)
        except (BackendError, TimeoutError):
            member.down_since = self._clock()
        else:
            member.healthy, member.failures = True, 0
        finally:
            member.probing = False

    def _success(self, member: MemberState, started: float) -> None:
        member.failures = 0
        member.served += 1
        elapsed = self._clock() - started
        member.latency_ewma_s = (
            elapsed if member.served == 1 else 0.8 * member.latency_ewma_s + 0.2 * elapsed
        )

    def _failure(self, member: MemberState, error: BackendError) -> None:
        if not error.retryable:
            return
        member.failures += 1
        if member.failures >= self.max_failures and member.healthy:
            member.healthy = False
            member.down_since = self._clock()

    @property
    def healthy_count(self) -> int:
        return sum(m.healthy for m in self.members)

    @property
    def in_flight(self) -> int:
        return sum(m.in_flight for m in self.members)

    # --- the backend interface ------------------------------------------------------------

    def _take(self, tried: set[int]) -> tuple[MemberState, float]:
        """The next member to try (counted as busy from now), and when it started."""
        member = self._pick(tried)
        tried.add(self.members.index(member))
        member.in_flight += 1
        member.last_used = started = self._clock()
        return member, started

    async def complete(self, request: ChatRequest) -> Completion:
        tried: set[int] = set()
        while True:
            member, started = self._take(tried)
            try:
                result = await member.backend.complete(request)
            except BackendError as exc:
                self._failure(member, exc)
                if not exc.retryable or len(tried) == len(self.members):
                    raise
                continue
            finally:
                member.in_flight -= 1
            self._success(member, started)
            return _from(member, result)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        tried: set[int] = set()
        while True:
            member, started = self._take(tried)
            produced = False
            try:
                async for item in member.backend.stream(request):
                    produced = True
                    yield _from(member, item) if isinstance(item, Completion) else item
            except BackendError as exc:
                self._failure(member, exc)
                if produced or not exc.retryable or len(tried) == len(self.members):
                    raise
                continue
            finally:
                member.in_flight -= 1
            self._success(member, started)
            return

    async def aclose(self) -> None:
        for task in list(self._probes):
            task.cancel()
        await asyncio.gather(*(m.backend.aclose() for m in self.members))


def _from(member: MemberState, completion: Completion) -> Completion:
    """`completion`, saying which member produced it (unless a pool within said already)."""
    if completion.backend:
        return completion
    return dataclasses.replace(completion, backend=member.backend.name)
