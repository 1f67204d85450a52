"""`Escalations`: how the server runs the escalations of its connections.

Each escalation is a task of its own, so a cancel from the device or its deadline can stop it:
rate limit, privacy check, the agent's answer (whole, or streamed as deltas), exactly one
terminal frame (`result` or a typed error), metrics, and the interaction log.
"""

from __future__ import annotations

import asyncio
import logging
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
        if not self._rate.allow(conn.device_id, time.monotonic()):
            self.metrics.requests.labels(request.priority, "rate_limited").inc()
            conn.session.send(
                make_error(
                    ErrorCode.RATE_LIMITED,
                    "request rate limit reached",
                    request_id=request.request_id,
                )
            )
            return
        task = asyncio.create_task(self._run(conn, request))
        conn.tasks[request.request_id] = task
        task.add_done_callback(lambda _: conn.tasks.pop(request.request_id, None))

    async def _run(self, conn: Requester, request: Escalate) -> None:
        assert conn.device_id is not None
        started = time.monotonic()
        deadline = started + request.deadline_ms / 1000.0
        request, pii = self.agent.scrub(request)
        if request.max_tokens > self.max_tokens:
            request = request.model_copy(update={"max_tokens": self.max_tokens})
        if pii:
            for kind in pii:
                self.metrics.privacy_violations.labels(kind).inc()
            try:
                await self.store.record_privacy_event(conn.device_id, request.request_id, list(pii))
            except StoreError as exc:  # bookkeeping: its failure must not fail the request
                log.warning("store write failed: %s", exc)
        outcome, answer, error_name = "ok", None, None
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
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
            if answer.grounded:
                self.metrics.grounded.inc()
            self.metrics.prompt_tokens.inc(answer.prompt_tokens)
            self.metrics.completion_tokens.inc(answer.completion_tokens)
        except asyncio.CancelledError:
            # Cancelled by the device, by shutdown, or because the connection went away; in
            # each case this task ends here after telling the device (if it is still there).
            outcome = error_name = "cancelled"
            if self.draining:
                await self._fail(conn, request, ErrorCode.SHUTTING_DOWN, "server shutting down")
            else:
                await self._fail(conn, request, ErrorCode.CANCELLED, "cancelled")
        except TimeoutError:
            outcome = error_name = "deadline_exceeded"
            await self._fail(conn, request, ErrorCode.DEADLINE_EXCEEDED, "deadline passed")
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
            elapsed = time.monotonic() - started
            self.metrics.finished(request.priority, outcome, elapsed)
            await self.recorder.record(
                NewInteraction(
                    device_id=conn.device_id,
                    request_id=request.request_id,
                    session_id=conn.session_id,
                    messages=[m.model_dump() for m in request.messages],
                    placeholders=list(request.placeholders),
                    status="ok"
                    if outcome == "ok"
                    else ("cancelled" if outcome == "cancelled" else "error"),
                    priority=request.priority,
                    answer=answer.text if answer else None,
                    error_name=error_name,
                    intent=request.intent,
                    route_reasons=list(request.reasons),
                    latency_ms=int(elapsed * 1000),
                    prompt_tokens=answer.prompt_tokens if answer else 0,
                    completion_tokens=answer.completion_tokens if answer else 0,
                    backend=answer.backend if answer else None,
                    model=answer.model if answer else None,
                    fact_ids=list(answer.fact_ids) if answer else [],
                )
            )

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


def _loop_time(monotonic_deadline: float) -> float:
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())
