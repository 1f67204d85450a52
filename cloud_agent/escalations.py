"""`Escalations`: how the server runs the escalations of its connections.

Each escalation is a task of its own, so a cancel from the device or its deadline can stop it:
rate limit, privacy check, the agent's answer (whole, or streamed as deltas), exactly one
terminal frame (`result` or a typed error), metrics, and the interaction log.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from cloud_agent.agent import Answer, CloudAgent
from cloud_agent.backends.base import ChatTurn
from cloud_agent.errors import BackendError, Overloaded, StoreError
from cloud_agent.metrics import Metrics
from cloud_agent.recorder import InteractionRecorder
from cloud_agent.store import NewInteraction, Store
from protocol import Delta, ErrorCode, Escalate, Limits, Result, ServerSession, Usage, make_error

__all__ = ["Escalations", "Requester"]

log = logging.getLogger("edgeloop.cloud.escalations")


class Requester(Protocol):
    """What escalations need to know of one authenticated connection."""

    session: ServerSession
    session_id: str
    device_id: str | None
    tasks: dict[str, asyncio.Task[None]]
    """Escalations in flight, by request id."""


class _RateLimiter:
    """A token bucket per device: `rate_per_minute` requests, bursts up to the same number."""

    def __init__(self, rate_per_minute: int) -> None:
        self.capacity = float(rate_per_minute)
        self.rate = rate_per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, device_id: str, now: float) -> bool:
        tokens, last = self._buckets.get(device_id, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[device_id] = (tokens, now)
            return False
        self._buckets[device_id] = (tokens - 1.0, now)
        return True


class Escalations:
    """Runs the escalations of every connection of one server, each as a task in the
    connection's `tasks` (which the server cancels when the device cancels or goes)."""

    def __init__(
        self,
        store: Store,
        *,
        agent: CloudAgent,
        metrics: Metrics,
        recorder: InteractionRecorder,
        limits: Limits,
        max_tokens: int,
        flush: Callable[[Any], Awaitable[None]],
    ) -> None:
        self.store = store
        self.agent = agent
        self.metrics = metrics
        self.recorder = recorder
        self.max_tokens = max_tokens
        """The most tokens one escalation is answered with, whatever it asks."""
        self._flush = flush
        """Sends what a connection's session has queued (the server's one writer)."""
        self.draining = False
        """Set at shutdown: new escalations are refused, cancelled ones end `shutting_down`."""
        self._rate = _RateLimiter(limits.max_requests_per_minute)
        self._deadlines = _Deadlines()
        # Characters of answer text per frame: the protocol's field limit, and room in a frame
        # (4 bytes per character at worst, plus the envelope).
        self._max_text = max(256, min(65536, (limits.max_message_bytes - 1024) // 4))

    def start(self, conn: Requester, request: Escalate) -> None:
        """Refuse the request at once (shutting down, rate limited) or run it as a task."""
        if self.draining:
            conn.session.send(
                make_error(
                    ErrorCode.SHUTTING_DOWN, "server shutting down", request_id=request.request_id
                )
            )
            return
        assert conn.device_id is not None
        now = time.monotonic()
        if not self._rate.allow(conn.device_id, now):
            self.metrics.escalations.refused(request.priority, "rate_limited")
            conn.session.send(
                make_error(
                    ErrorCode.RATE_LIMITED,
                    "request rate limit reached",
                    request_id=request.request_id,
                )
            )
            return
        task = asyncio.create_task(self._run(conn, request, now))
        conn.tasks[request.request_id] = task
        self._deadlines.watch(task, now + request.deadline_ms / 1000.0)

    async def _run(self, conn: Requester, request: Escalate, started: float) -> None:
        assert conn.device_id is not None
        task = conn.tasks[request.request_id]  # `start` put it there before it could run
        deadline = started + request.deadline_ms / 1000.0
        outcome, answer, error_name, expired = "ok", None, None, False
        try:
            try:
                request, pii = self.agent.scrub(request)
                answer = await self._answer(conn, request, deadline, pii)
            finally:
                # Before anything below awaits: from here on, the deadline cancels nothing.
                expired = self._deadlines.unwatch(task)
            if answer.grounded:
                self.metrics.grounded.inc()
            self.metrics.escalations.spent(answer.prompt_tokens, answer.completion_tokens)
        except asyncio.CancelledError:
            if expired:
                task.uncancel()  # the deadline's own cancellation, handled here
                outcome = error_name = "deadline_exceeded"
                await self._fail(conn, request, ErrorCode.DEADLINE_EXCEEDED, "deadline passed")
            else:
                # Cancelled by the device, by shutdown, or because the connection went away;
                # in each case this task ends here after telling the device (if still there).
                outcome = error_name = "cancelled"
                if self.draining:
                    await self._fail(conn, request, ErrorCode.SHUTTING_DOWN, "server shutting down")
                else:
                    await self._fail(conn, request, ErrorCode.CANCELLED, "cancelled")
        except Overloaded as exc:
            outcome = error_name = "overloaded"
            await self._fail(conn, request, ErrorCode.OVERLOADED, str(exc))
        except BackendError as exc:
            outcome = error_name = "backend_error"
            await self._fail(conn, request, ErrorCode.BACKEND_ERROR, str(exc))
        except Exception:
            # A bug must not leave the device waiting: end the request, keep the trace.
            log.exception("escalation %s failed", request.request_id)
            outcome = error_name = "internal_error"
            await self._fail(conn, request, ErrorCode.INTERNAL_ERROR, "internal error")
        finally:
            if conn.tasks.get(request.request_id) is task:
                del conn.tasks[request.request_id]
            elapsed = time.monotonic() - started
            self.metrics.escalations.finished(request.priority, outcome, elapsed)
            await self.recorder.record(
                NewInteraction(
                    device_id=conn.device_id,
                    request_id=request.request_id,
                    session_id=conn.session_id,
                    messages=request.messages,
                    placeholders=request.placeholders,
                    status="ok"
                    if outcome == "ok"
                    else ("cancelled" if outcome == "cancelled" else "error"),
                    priority=request.priority,
                    answer=answer.text if answer else None,
                    error_name=error_name,
                    intent=request.intent,
                    route_reasons=request.reasons,
                    latency_ms=int(elapsed * 1000),
                    prompt_tokens=answer.prompt_tokens if answer else 0,
                    completion_tokens=answer.completion_tokens if answer else 0,
                    backend=answer.backend if answer else None,
                    model=answer.model if answer else None,
                    fact_ids=answer.fact_ids if answer else (),
                )
            )

    async def _answer(
        self, conn: Requester, request: Escalate, deadline: float, pii: tuple[str, ...]
    ) -> Answer:
        """Answer the (scrubbed) request and send its `result`; returns what was answered."""
        assert conn.device_id is not None
        if request.max_tokens > self.max_tokens:
            request = request.model_copy(update={"max_tokens": self.max_tokens})
        if pii:
            for kind in pii:
                self.metrics.privacy_violations.labels(kind).inc()
            try:
                await self.store.record_privacy_event(conn.device_id, request.request_id, list(pii))
            except StoreError as exc:  # bookkeeping: its failure must not fail the request
                log.warning("store write failed: %s", exc)
        if request.stream:
            answer = await self._generate(conn, request, deadline, pii)
        else:
            answer = await self.agent.complete(
                [ChatTurn(m.role, m.content) for m in request.messages],
                max_tokens=request.max_tokens,
                lane=request.priority,
                deadline=deadline,
                pii_kinds=pii,
            )
        text, finish = answer.text, answer.finish_reason
        if len(text) > self._max_text:
            # Longer than a frame may carry: cut, and say so.
            text, finish = text[: self._max_text], "length"
        await self._send(
            conn,
            Result(
                request_id=request.request_id,
                text=text,
                finish_reason=finish,
                usage=Usage(
                    prompt_tokens=answer.prompt_tokens,
                    completion_tokens=answer.completion_tokens,
                ),
                model=answer.model[:256],
                sources=list(answer.fact_ids),
            ),
        )
        return answer

    async def _generate(
        self, conn: Requester, request: Escalate, deadline: float, pii: tuple[str, ...]
    ) -> Answer:
        """Run the agent and stream its pieces to the device.

        Generation does not wait for the socket: pieces the device has not taken yet are
        coalesced into the next delta. So a device that reads slowly costs its own memory
        (bounded by the answer's length), never backend capacity other devices need.
        """
        pending: list[str] = []
        ready = asyncio.Event()
        finished = False

        async def sender() -> None:
            seq = 0
            while True:
                await ready.wait()
                ready.clear()
                if pending:
                    text = "".join(pending)
                    pending.clear()
                    for start in range(0, len(text), self._max_text):
                        piece = text[start : start + self._max_text]
                        await self._send(
                            conn, Delta(request_id=request.request_id, seq=seq, text=piece)
                        )
                        seq += 1
                if finished and not pending:
                    return

        answer: Answer | None = None
        streaming = asyncio.create_task(sender())
        try:
            async for item in self.agent.answer(request, deadline=deadline, pii_kinds=pii):
                if isinstance(item, Answer):
                    answer = item
                elif item:
                    pending.append(item)
                    ready.set()
            finished = True
            ready.set()
            await streaming
        finally:
            if not streaming.done():
                streaming.cancel()
                await asyncio.gather(streaming, return_exceptions=True)
        assert answer is not None, "the agent ends every answer with an Answer"
        return answer

    async def _send(self, conn: Requester, message: Result | Delta) -> None:
        if conn.session.closed or not conn.session.in_flight(message.request_id):
            return
        conn.session.send(message)
        await self._flush(conn)

    async def _fail(self, conn: Requester, request: Escalate, code: ErrorCode, text: str) -> None:
        if conn.session.is_open and conn.session.in_flight(request.request_id):
            conn.session.send(make_error(code, text, request_id=request.request_id))
            if not self.draining:  # on shutdown, the server's goodbye flushes with a time limit
                await asyncio.shield(self._flush(conn))


class _Deadlines:
    """When each escalation in flight must be over, watched by one timer for them all.

    An `asyncio.timeout` per escalation arms and cancels a timer handle each time, an eighth of
    the server's work per escalation in `bench.cloud_roundtrip`. Here an escalation costs a dict
    entry; the one timer is armed for the earliest deadline and, when it fires, cancels the
    tasks past theirs and is armed again for the earliest left. Under steady traffic, whose
    requests end long before their deadlines, it fires about once per deadline's length.
    """

    _SLACK_S = 0.001
    """Deadlines this close are due: the loop's clock may run a millisecond behind (uvloop's
    counts whole milliseconds), and a timer that finds nothing due would fire again at once."""

    def __init__(self) -> None:
        self._due: dict[asyncio.Task[None], float] = {}
        """Each watched task's deadline (monotonic clock)."""
        self._expired: set[asyncio.Task[None]] = set()
        """Tasks cancelled for their deadline, until they `unwatch`."""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def watch(self, task: asyncio.Task[None], deadline: float) -> None:
        """Cancel `task` once `deadline` (monotonic clock) passes, unless it unwatches first."""
        self._due[task] = deadline
        if deadline < self._timer_at:
            self._arm(deadline)

    def unwatch(self, task: asyncio.Task[None]) -> bool:
        """Stop watching `task`; returns whether its deadline passed (and cancelled it)."""
        if self._due.pop(task, None) is not None or task not in self._expired:
            return False
        self._expired.remove(task)
        return True

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + (deadline - time.monotonic()), self._fire)
        self._timer_at = deadline

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        now = time.monotonic() + self._SLACK_S
        # Tasks cancelled before they ever ran never unwatch: forget them once they are done.
        self._expired = {task for task in self._expired if not task.done()}
        for task in [task for task, deadline in self._due.items() if deadline <= now]:
            del self._due[task]
            self._expired.add(task)
            task.cancel()
        if self._due:
            self._arm(min(self._due.values()))
