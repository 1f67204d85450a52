"""The WebSocket endpoint: one `ServerSession` per connection, driven over `websockets`.

The session machine owns the protocol; this module does what needs I/O: reading and writing
frames, looking devices up and storing what the session accepted, running escalations as tasks
(so a cancel or a deadline can stop them), rate limiting, and shutting down gracefully.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from cloud_agent.agent import Answer, CloudAgent
from cloud_agent.backends.base import ChatTurn
from cloud_agent.batching import Batcher
from cloud_agent.distribution import BundleDistribution
from cloud_agent.errors import (
    BackendError,
    EnrollmentRefused,
    Overloaded,
    StoreError,
)
from cloud_agent.inbox import Inbox
from cloud_agent.metrics import Metrics
from cloud_agent.recorder import InteractionRecorder
from cloud_agent.rollout import RolloutPolicy
from cloud_agent.store import (
    DeviceRecord,
    NewInteraction,
    SessionEvent,
    Store,
)
from protocol import (
    SUBPROTOCOL,
    AuthRequested,
    CancelRequested,
    CloseCode,
    CloseFrame,
    Delta,
    EnrollmentRequested,
    ErrorCode,
    Escalate,
    EscalationReceived,
    Event,
    FeedbackReceived,
    FetchReceived,
    Goodbye,
    HelloReceived,
    Limits,
    ProtocolViolation,
    ReportReceived,
    Result,
    ServerSession,
    UpdateStatusReceived,
    Usage,
    make_error,
)
from shared.ids import new_device_id, new_session_id
from shared.keys import SigningKey, VerifyKey

__all__ = ["CloudServer"]

log = logging.getLogger("edgeloop.cloud.server")


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


@dataclass(eq=False)
class _Connection:
    ws: ServerConnection
    session: ServerSession
    session_id: str = field(default_factory=new_session_id)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    """Escalations in flight, by request id."""
    acks: set[asyncio.Task[None]] = field(default_factory=set)
    """Messages being stored and acknowledged (`Inbox`)."""
    device_id: str | None = None
    adapter_version: int | None = None
    base_model_sha256: str | None = None
    offered: int | None = None
    auth_timer: asyncio.TimerHandle | None = None
    """Refuses the session if it is not authenticated in time; cancelled once it is."""
    refusal: asyncio.Task[None] | None = None
    """Sends the auth-timeout refusal."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the connection is over and what it had to record is recorded."""


class CloudServer:
    """Serves protocol v1 to devices and third-party agents."""

    retry_after_s = 5
    """What the goodbye at shutdown tells devices: reconnecting sooner is pointless (a restart
    or another replica takes over within it)."""

    def __init__(
        self,
        *,
        store: Store,
        agent: CloudAgent,
        signing_key: SigningKey,
        server_id: str,
        limits: Limits,
        metrics: Metrics | None = None,
        max_queue: int = 16,
        auth_timeout_s: float = 10.0,
        max_tokens: int = 32768,
        ssl_context: ssl.SSLContext | None = None,
        recorder: InteractionRecorder | None = None,
        rollout_policy: RolloutPolicy | None = None,
        bundles_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics or Metrics()
        self.recorder = recorder or InteractionRecorder(store, metrics=self.metrics)
        self.agent = agent
        self.signing_key = signing_key
        self.server_id = server_id
        self.limits = limits
        self.max_queue = max_queue
        self.auth_timeout_s = auth_timeout_s
        self.max_tokens = max_tokens
        """The most tokens one escalation is answered with, whatever it asks."""
        self.ssl_context = ssl_context
        self._rate = _RateLimiter(limits.max_requests_per_minute)
        # Characters of answer text per frame: the protocol's field limit, and room in a frame
        # (4 bytes per character at worst, plus the envelope).
        self._max_text = max(256, min(65536, (limits.max_message_bytes - 1024) // 4))
        self.updates = BundleDistribution(
            store,
            self.metrics,
            max_chunk=max(1024, limits.max_message_bytes - 1024),
            rollout_policy=rollout_policy,
            bundles_dir=bundles_dir,
        )
        self.updates.on_rollout_change = self.push_offers
        self._connections: set[_Connection] = set()
        self._sessions: dict[str, _Connection] = {}
        """Each device's open session, by device id (one per device)."""
        # Devices authenticating together share one query (`Batcher`); it calls `self.store`
        # when it runs, so the store is looked up late, not captured.
        self._devices = Batcher[str, DeviceRecord](
            lambda ids: self.store.get_devices(ids),
            observe=self.metrics.store_batch.labels("devices").observe,
        )
        self.inbox = Inbox(
            store,
            metrics=self.metrics,
            recorder=self.recorder,
            agent=agent,
            updates=self.updates,
            flush=self._flush,
        )
        self._server: Server | None = None
        self._draining = False

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start listening; returns the bound port."""
        self._server = await serve(
            self._handler,
            host,
            port,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            max_size=self.limits.max_message_bytes,
            max_queue=self.max_queue,
            ping_interval=self.limits.heartbeat_s,
            ping_timeout=self.limits.heartbeat_s * 2,
            ssl=self.ssl_context,
            compression=None,
        )
        return int(next(iter(self._server.sockets)).getsockname()[1])

    @property
    def session_count(self) -> int:
        return sum(1 for c in self._connections if c.session.is_open)

    async def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop accepting; let in-flight requests finish within `grace_s`, fail the rest with
        `shutting_down`, say goodbye to every session and close."""
        self._draining = True
        if self._server is not None:
            self._server.close(close_connections=False)
        pending = [t for c in self._connections for t in (*c.tasks.values(), *c.acks)]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await asyncio.gather(*(self._goodbye(c, grace_s) for c in list(self._connections)))
        if self._server is not None:
            await self._server.wait_closed()
        # A batch whose callers went away still runs: let it finish before the store closes,
        # within the grace period (a store that hangs cannot hold the shutdown hostage).
        try:
            async with asyncio.timeout(grace_s):
                await asyncio.gather(
                    self._devices.drain(), self.inbox.drain(), self.updates.drain()
                )
        except TimeoutError:
            log.warning("store work still running after %.1f s; closing anyway", grace_s)

    async def _goodbye(self, conn: _Connection, grace_s: float) -> None:
        session = conn.session
        if session.is_open:
            for request_id in session.in_flight_ids():
                session.send(
                    make_error(
                        ErrorCode.SHUTTING_DOWN, "server shutting down", request_id=request_id
                    )
                )
            session.send(Goodbye(reason="shutdown", retry_after_s=self.retry_after_s))
        else:
            session.refuse(ErrorCode.SHUTTING_DOWN, "server shutting down")
        await self._flush_or_abort(conn, grace_s)

    async def _flush_or_abort(self, conn: _Connection, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._flush(conn), timeout=max(0.1, timeout_s))
        except TimeoutError:
            # A peer that does not read cannot hold the shutdown (or its own end) hostage.
            conn.ws.transport.abort()

    async def end_sessions(self, device_ids: Iterable[str]) -> int:
        """End the open sessions of these devices, now revoked: each request in flight ends
        with `device_revoked`, then the session with it (close 1008), and the escalations'
        work stops. Returns how many sessions ended, once they are over (at most a few
        seconds for a peer that does not read)."""
        ending = [
            conn
            for device_id in set(device_ids)
            if (conn := self._sessions.get(device_id)) is not None and conn.session.is_open
        ]
        for conn in ending:
            session = conn.session
            message = "this device has been revoked"
            for request_id in session.in_flight_ids():
                session.send(make_error(ErrorCode.DEVICE_REVOKED, message, request_id=request_id))
            session.refuse(ErrorCode.DEVICE_REVOKED, message)
            for task in conn.tasks.values():
                task.cancel()
            log.info("device %s revoked: session %s ended", conn.device_id, conn.session_id)
        await asyncio.gather(*(self._flush_or_abort(c, 5.0) for c in ending))
        if ending:  # over, and their escalations recorded
            waits = [asyncio.ensure_future(c.ended.wait()) for c in ending]
            _, late = await asyncio.wait(waits, timeout=5)
            for wait in late:
                wait.cancel()
        return len(ending)

    # --- one connection -------------------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        self.metrics.connections.inc()
        if ws.subprotocol != SUBPROTOCOL:
            await ws.close(int(CloseCode.POLICY_VIOLATION), f"subprotocol {SUBPROTOCOL} required")
            return
        conn = _Connection(ws, ServerSession(server_id=self.server_id, limits=self.limits))
        self._connections.add(conn)
        timer = conn.auth_timer = asyncio.get_running_loop().call_later(
            self.auth_timeout_s, self._auth_expired, conn
        )
        try:
            async for data in ws:
                if isinstance(data, str):
                    conn.session.receive_text(data)
                else:
                    conn.session.receive_binary(data)
                await self._process(conn)
                if conn.session.closed:
                    break
        except ConnectionClosed:
            pass
        finally:
            timer.cancel()
            self._connections.discard(conn)
            if conn.device_id is not None and self._sessions.get(conn.device_id) is conn:
                del self._sessions[conn.device_id]
            for task in conn.tasks.values():
                task.cancel()
            if conn.tasks:
                await asyncio.gather(*conn.tasks.values(), return_exceptions=True)
            # Messages being stored finish (their acks go nowhere; the device resends, and
            # the resend is acked as a duplicate).
            if conn.acks:
                await asyncio.gather(*conn.acks, return_exceptions=True)
            if conn.device_id is not None:
                self.metrics.sessions.dec()
                await self.recorder.record(
                    SessionEvent("ended", conn.session_id, conn.device_id, _now(),
                                 close_code=ws.close_code)
                )  # fmt: skip
            conn.ended.set()

    def _auth_expired(self, conn: _Connection) -> None:
        # A timer rather than a sleeping task per connection: nothing is left behind once the
        # session is open (`_opened` cancels it).
        if not conn.session.is_open and not conn.session.closed:
            self.metrics.auth_failures.labels("timeout").inc()
            conn.session.refuse(ErrorCode.AUTH_TIMEOUT, "not authenticated in time")
            conn.refusal = asyncio.create_task(self._flush(conn))

    async def _process(self, conn: _Connection) -> None:
        """Act on the session's events until it has none left, flushing frames as we go."""
        while events := conn.session.events_received():
            for event in events:
                await self._on_event(conn, event)
            await self._flush(conn)
        await self._flush(conn)

    async def _flush(self, conn: _Connection) -> None:
        if not conn.session.has_data_to_send:
            return  # most calls, after events that answer later: skip the lock
        # One writer at a time: a `chunk` header and its binary frame must stay adjacent.
        async with conn.write_lock:
            for frame in conn.session.data_to_send():
                try:
                    if isinstance(frame, CloseFrame):
                        await conn.ws.close(int(frame.code), frame.reason)
                        return
                    await conn.ws.send(frame.data)
                except ConnectionClosed:
                    conn.session.receive_close(1006, "connection lost")
                    return

    async def _on_event(self, conn: _Connection, event: Event) -> None:
        session = conn.session
        match event:
            case HelloReceived():
                if self._draining:
                    session.refuse(ErrorCode.SHUTTING_DOWN, "server shutting down")
            case AuthRequested(device_id=device_id):
                await self._authenticate(conn, device_id)
            case EnrollmentRequested(request=request):
                try:
                    device = await self.store.enroll_device(
                        request.token, new_device_id(), request.public_key, request.name
                    )
                except EnrollmentRefused as exc:
                    self.metrics.auth_failures.labels("enrollment").inc()
                    session.refuse(ErrorCode.INVALID_ENROLLMENT_TOKEN, str(exc))
                    return
                except StoreError:
                    session.refuse(ErrorCode.INTERNAL_ERROR, "store unavailable, try again")
                    return
                self.metrics.enrollments.inc()
                session.complete_enrollment(
                    device.id, self.signing_key.verify_key(), session_id=conn.session_id
                )
                await self._opened(conn, device.id)
            case EscalationReceived(request=request):
                self._start_escalation(conn, request)
            case CancelRequested(request_id=request_id):
                task = conn.tasks.get(request_id)
                if task is not None:
                    task.cancel()
                    await asyncio.wait([task])
                # A task cancelled before it ran never reached its own handler: end the
                # request here, so every request still gets exactly one terminal frame.
                if session.is_open and session.in_flight(request_id):
                    session.send(
                        make_error(ErrorCode.CANCELLED, "cancelled", request_id=request_id)
                    )
            case FeedbackReceived(message=fb):
                await self.inbox.feedback(conn, fb)
            case ReportReceived(message=rp):
                await self.inbox.report(conn, rp)
            case UpdateStatusReceived(message=us):
                await self.inbox.update_status(conn, us)
            case FetchReceived(request=request):
                await self.updates.fetch(conn.session, request)
            case ProtocolViolation(code=code):
                self.metrics.protocol_violations.labels(code.wire_name).inc()

    async def _authenticate(self, conn: _Connection, device_id: str) -> None:
        session = conn.session
        try:
            device = await self._devices.submit(device_id)
        except StoreError:
            session.refuse(ErrorCode.INTERNAL_ERROR, "store unavailable, try again")
            return
        if device is None:
            self.metrics.auth_failures.labels("unknown_device").inc()
            session.refuse(ErrorCode.UNKNOWN_DEVICE, "no device is enrolled under this id")
            return
        if device.revoked:
            self.metrics.auth_failures.labels("revoked").inc()
            session.refuse(ErrorCode.DEVICE_REVOKED, "this device has been revoked")
            return
        if not session.accept(VerifyKey.from_b64(device.public_key), session_id=conn.session_id):
            self.metrics.auth_failures.labels("bad_signature").inc()
            return
        await self._opened(conn, device.id)

    async def _opened(self, conn: _Connection, device_id: str) -> None:
        if conn.auth_timer is not None:
            conn.auth_timer.cancel()
        conn.device_id = device_id
        self.metrics.sessions.inc()
        older = self._sessions.get(device_id)
        if older is not None and older.session.is_open:
            self._replace(older)
        self._sessions[device_id] = conn
        hello = conn.session.hello
        conn.adapter_version = hello.adapter_version if hello else None
        conn.base_model_sha256 = hello.base_model.sha256 if hello and hello.base_model else None
        # Session bookkeeping goes through the batched recorder: connecting thousands of
        # devices costs a few commits, not two fsyncs each.
        await self.recorder.record(
            SessionEvent(
                "started", conn.session_id, device_id, _now(), server_id=self.server_id,
                adapter_version=conn.adapter_version, base_model_sha256=conn.base_model_sha256,
            )
        )  # fmt: skip
        await self.updates.offer(conn)

    def _replace(self, older: _Connection) -> None:
        """One session per device: a newer one closes the older (4003). The device's limits
        on requests in flight hold per device, and a connection its device has given up for
        dead (a half-open socket) does not linger until the heartbeat finds it out."""
        older.session.send(Goodbye(reason="session_replaced"))  # closes with 4003
        for task in older.tasks.values():
            task.cancel()
        older.refusal = asyncio.create_task(self._flush_or_abort(older, 5.0))

    async def push_offers(self) -> None:
        """Re-check offers for every connected device (a bundle was published or moved on):
        one read of the offers for them all. Raises `StoreError` when the store cannot say."""
        offers = await self.store.offers()
        for conn in list(self._connections):
            await self.updates.offer(conn, offers)
            await self._flush(conn)

    # --- escalations ----------------------------------------------------------------------

    def _start_escalation(self, conn: _Connection, request: Escalate) -> None:
        if self._draining:
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
        task = asyncio.create_task(self._escalate(conn, request))
        conn.tasks[request.request_id] = task
        task.add_done_callback(lambda _: conn.tasks.pop(request.request_id, None))

    async def _escalate(self, conn: _Connection, request: Escalate) -> None:
        assert conn.device_id is not None
        started = time.monotonic()
        deadline = started + request.deadline_ms / 1000.0
        request, pii = self.agent.scrub(request)
        if request.max_tokens > self.max_tokens:
            request = request.model_copy(update={"max_tokens": self.max_tokens})
        if pii:
            for kind in pii:
                self.metrics.privacy_violations.labels(kind).inc()
            await self._best_effort(
                self.store.record_privacy_event(conn.device_id, request.request_id, list(pii))
            )
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
            if self._draining:
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
        self, conn: _Connection, request: Escalate, deadline: float, pii: tuple[str, ...]
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

    async def _send(self, conn: _Connection, message: Any) -> None:
        if conn.session.closed or not conn.session.in_flight(message.request_id):
            return
        conn.session.send(message)
        await self._flush(conn)

    async def _fail(self, conn: _Connection, request: Escalate, code: ErrorCode, text: str) -> None:
        if conn.session.is_open and conn.session.in_flight(request.request_id):
            conn.session.send(make_error(code, text, request_id=request.request_id))
            if not self._draining:  # on shutdown, `_goodbye` flushes with a time limit
                await asyncio.shield(self._flush(conn))

    async def _best_effort(self, write: Awaitable[Any]) -> None:
        """Writes whose failure must not fail the request (logs, bookkeeping)."""
        try:
            await write
        except StoreError as exc:
            log.warning("store write failed: %s", exc)


def _loop_time(monotonic_deadline: float) -> float:
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())


def _now() -> datetime:
    return datetime.now(UTC)
