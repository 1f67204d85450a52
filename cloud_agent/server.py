"""The WebSocket endpoint: one `ServerSession` per connection, driven over `transport`.

The session machine owns the protocol; this module does what needs I/O: feeding it messages and
writing its frames, looking devices up and storing what the session accepted, handing
escalations to `Escalations`, ending sessions (revoked, replaced) and shutting down gracefully.

A connection's messages are acted on in order. Most are acted on as they arrive (an escalation
starts its own task); one that needs the store or another wait (authentication, enrollment,
feedback, a cancel, a fetch) is acted on in a task, and the messages behind it wait in the
connection's backlog, the socket paused once `max_queue` of them are waiting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from websockets.exceptions import ConnectionClosed

from cloud_agent.agent import CloudAgent
from cloud_agent.batching import Batcher
from cloud_agent.cluster import SESSIONS, Cluster
from cloud_agent.distribution import BundleDistribution
from cloud_agent.errors import EnrollmentRefused, StoreError
from cloud_agent.escalations import Escalations
from cloud_agent.inbox import Inbox
from cloud_agent.metrics import Metrics
from cloud_agent.recorder import InteractionRecorder
from cloud_agent.rollout import RolloutPolicy
from cloud_agent.store import (
    DeviceRecord,
    SessionEvent,
    Store,
)
from cloud_agent.transport import WebSocket, WebSocketServer, serve
from protocol import (
    SUBPROTOCOL,
    AuthRequested,
    CancelRequested,
    CloseCode,
    CloseFrame,
    EnrollmentRequested,
    ErrorCode,
    EscalationReceived,
    Event,
    FeedbackReceived,
    FetchReceived,
    Goodbye,
    GoodbyeReceived,
    HelloReceived,
    KeyEndorsement,
    Limits,
    PeerError,
    ProtocolViolation,
    ReportReceived,
    ServerSession,
    SessionClosed,
    SessionStateError,
    UpdateStatusReceived,
    make_error,
)
from shared.ids import new_device_id, new_session_id
from shared.keys import SigningKey, VerifyKey

__all__ = ["CloudServer"]

log = logging.getLogger("edgeloop.cloud.server")


@dataclass(eq=False)
class _Connection:
    ws: WebSocket
    session: ServerSession
    server: CloudServer
    session_id: str = field(default_factory=new_session_id)
    backlog: deque[str | bytes] = field(default_factory=deque)
    """Messages waiting for the one before them to be acted on (`busy`)."""
    busy: asyncio.Task[None] | None = None
    """Acts on a message that needed a wait, then on the backlog."""
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    """Escalations in flight, by request id."""
    acks: set[asyncio.Task[None]] = field(default_factory=set)
    """Messages being stored and acknowledged (`Inbox`)."""
    device_id: str | None = None
    opened_at: float = 0.0
    """When the session opened (wall clock: replicas compare it)."""
    adapter_version: int | None = None
    base_model_sha256: str | None = None
    offered: int | None = None
    auth_timer: asyncio.TimerHandle | None = None
    """Refuses the session if it is not authenticated in time; cancelled once it is."""
    refusal: asyncio.Task[None] | None = None
    """Ends the session once a newer one replaced it (`_replace`)."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the connection is over and what it had to record is recorded."""

    # The transport's `Peer`: what arrives on the connection goes to the server.

    def message(self, data: str | bytes) -> None:
        self.server._received(self, data)

    def closed(self) -> None:
        self.server._lost(self)


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
        cluster: Cluster | None = None,
        key_rotations: tuple[KeyEndorsement, ...] = (),
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
        self.ssl_context = ssl_context
        self.key_rotations = key_rotations
        """The signing key's rotations, told to every device in `welcome`."""
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
        self.escalations = Escalations(
            store,
            agent=agent,
            metrics=self.metrics,
            recorder=self.recorder,
            limits=limits,
            max_tokens=max_tokens,
            flush=self._flush,
        )
        self.cluster = cluster
        self._announce: Batcher[str, None] | None = None
        """Tells the other replicas of the sessions opened here (with PostgreSQL)."""
        if cluster is not None:
            cluster.subscribe(SESSIONS, self._opened_elsewhere)
            if cluster.shared:
                # 64 sessions to a notice keeps its payload under PostgreSQL's 8,000 bytes.
                self._announce = Batcher[str, None](self._announce_sessions, max_batch=64)
        self._server: WebSocketServer | None = None
        self._endings: set[asyncio.Task[None]] = set()
        """Connections over, finishing what they had to record."""
        self._draining = False

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start listening; returns the bound port."""
        self._server = await serve(
            self._accept,
            host,
            port,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            max_size=self.limits.max_message_bytes,
            ping_interval=self.limits.heartbeat_s,
            ping_timeout=self.limits.heartbeat_s * 2,
            ssl=self.ssl_context,
        )
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def session_count(self) -> int:
        return sum(1 for c in self._connections if c.session.is_open)

    async def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop accepting; let in-flight requests finish within `grace_s`, fail the rest with
        `shutting_down`, say goodbye to every session and close."""
        self._draining = self.escalations.draining = True
        if self._server is not None:
            self._server.close()
        pending = [
            t
            for c in self._connections
            for t in (*c.tasks.values(), *c.acks, *([c.busy] if c.busy else []))
        ]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await asyncio.gather(*(self._goodbye(c, grace_s) for c in list(self._connections)))
        if self._server is not None:
            await self._server.wait_closed()
        if self._endings:
            await asyncio.gather(*self._endings, return_exceptions=True)
        # A batch whose callers went away still runs: let it finish before the store closes,
        # within the grace period (a store that hangs cannot hold the shutdown hostage).
        try:
            async with asyncio.timeout(grace_s):
                await asyncio.gather(
                    self._devices.drain(),
                    self.inbox.drain(),
                    self.updates.drain(),
                    *([self._announce.drain()] if self._announce is not None else []),
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

    def _accept(self, ws: WebSocket) -> _Connection:
        """A connection whose WebSocket handshake is done: its session starts."""
        self.metrics.connections.inc()
        session = ServerSession(
            server_id=self.server_id, limits=self.limits, signing_keys=self.key_rotations
        )
        conn = _Connection(ws, session, self)
        self._connections.add(conn)
        if ws.subprotocol != SUBPROTOCOL:  # the handshake requires it: belt and braces
            ws.close(int(CloseCode.POLICY_VIOLATION), f"subprotocol {SUBPROTOCOL} required")
            return conn
        conn.auth_timer = asyncio.get_running_loop().call_later(
            self.auth_timeout_s, self._auth_expired, conn
        )
        return conn

    def _received(self, conn: _Connection, data: str | bytes) -> None:
        if conn.busy is not None:
            conn.backlog.append(data)
            if len(conn.backlog) >= self.max_queue:
                conn.ws.pause_reading()
            return
        self._act(conn, self._feed(conn, data))

    @staticmethod
    def _feed(conn: _Connection, data: str | bytes) -> list[Event]:
        if isinstance(data, str):
            conn.session.receive_text(data)
        else:
            conn.session.receive_binary(data)
        return conn.session.events_received()

    def _act(self, conn: _Connection, events: list[Event]) -> None:
        """Act on `events` now, up to one that needs a wait: that one and the rest go to a
        task (`_act_later`), and the connection's next messages wait behind it."""
        for i, event in enumerate(events):
            if not self._act_now(conn, event):
                conn.busy = asyncio.create_task(self._act_later(conn, events[i:]))
                break
        self._write(conn)

    def _act_now(self, conn: _Connection, event: Event) -> bool:
        """Act on `event` if that needs no wait; returns whether it did."""
        session = conn.session
        match event:
            case EscalationReceived(request=request):  # first: by far the most frequent
                self.escalations.start(conn, request)
            case HelloReceived():
                if self._draining:
                    session.refuse(ErrorCode.SHUTTING_DOWN, "server shutting down")
            case ProtocolViolation(code=code):
                self.metrics.protocol_violations.labels(code.wire_name).inc()
            case SessionClosed() | GoodbyeReceived() | PeerError():
                pass  # the session acted on it; the connection closes (or goes on) by itself
            case _:
                return False
        return True

    async def _act_later(self, conn: _Connection, events: list[Event]) -> None:
        try:
            while True:
                for event in events:
                    if not self._act_now(conn, event):
                        await self._on_event(conn, event)
                    await self._flush(conn)
                if not conn.backlog or conn.session.closed:
                    return
                data = conn.backlog.popleft()
                if len(conn.backlog) < self.max_queue // 2:
                    conn.ws.resume_reading()
                events = self._feed(conn, data)
        except Exception as exc:
            if isinstance(exc, SessionStateError) and conn.session.closed:
                return  # the connection ended while this was acted on: no one to answer
            # A bug must not leave the connection stuck: end it, keep the trace.
            log.exception("acting on a message of session %s failed", conn.session_id)
            conn.session.refuse(ErrorCode.INTERNAL_ERROR, "internal error")
            self._write(conn)
        finally:
            conn.busy = None

    def _lost(self, conn: _Connection) -> None:
        """The connection is over: stop its work and record its end, in a task."""
        if conn.auth_timer is not None:
            conn.auth_timer.cancel()
        conn.session.receive_close(conn.ws.close_code or 1006, "connection closed")
        ending = asyncio.create_task(self._ended(conn))
        self._endings.add(ending)
        ending.add_done_callback(self._endings.discard)

    async def _ended(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if conn.device_id is not None and self._sessions.get(conn.device_id) is conn:
            del self._sessions[conn.device_id]
        for task in conn.tasks.values():
            task.cancel()
        if conn.tasks:
            await asyncio.gather(*conn.tasks.values(), return_exceptions=True)
        # What is being stored finishes (acks go nowhere; the device resends, and the resend
        # is acked as a duplicate).
        waits = [*conn.acks, *([conn.busy] if conn.busy else [])]
        if waits:
            await asyncio.gather(*waits, return_exceptions=True)
        if conn.device_id is not None:
            self.metrics.sessions.dec()
            await self.recorder.record(
                SessionEvent("ended", conn.session_id, conn.device_id, _now(),
                             close_code=conn.ws.close_code)
            )  # fmt: skip
        conn.ended.set()

    def _auth_expired(self, conn: _Connection) -> None:
        # A timer rather than a sleeping task per connection: nothing is left behind once the
        # session is open (`_opened` cancels it).
        if not conn.session.is_open and not conn.session.closed:
            self.metrics.auth_failures.labels("timeout").inc()
            conn.session.refuse(ErrorCode.AUTH_TIMEOUT, "not authenticated in time")
            self._write(conn)

    def _write(self, conn: _Connection) -> bool:
        """Write the frames the session queued; returns whether one of them closed it."""
        session = conn.session
        if not session.has_data_to_send:
            return False
        for frame in session.data_to_send():
            try:
                if isinstance(frame, CloseFrame):
                    conn.ws.close(int(frame.code), frame.reason)
                    return True
                conn.ws.send(frame.data)
            except ConnectionClosed:
                session.receive_close(1006, "connection lost")
                return False
        return False

    async def _flush(self, conn: _Connection) -> None:
        """Write the frames the session queued, then wait while the peer is behind reading
        (or, if they close the connection, until it is closed)."""
        if self._write(conn):
            await conn.ws.wait_closed()
        else:
            await conn.ws.drain()

    async def _on_event(self, conn: _Connection, event: Event) -> None:
        """Act on an event that needs a wait (`_act_now` takes the others)."""
        session = conn.session
        match event:
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
            case CancelRequested(request_id=request_id):
                task = conn.tasks.get(request_id)
                if task is not None:
                    task.cancel()
                    await asyncio.wait([task])
                    # One cancelled before it ran did not take itself out.
                    if conn.tasks.get(request_id) is task:
                        del conn.tasks[request_id]
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
        conn.opened_at = time.time()
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
        if self._announce is not None:
            await self._flush(conn)  # welcomed first: telling the replicas is a round trip
            await self._announce.submit(device_id)

    async def _announce_sessions(self, device_ids: list[str]) -> dict[str, None]:
        opened = [
            [device_id, conn.opened_at]
            for device_id in device_ids
            if (conn := self._sessions.get(device_id)) is not None
        ]
        if opened and self.cluster is not None:
            notice = {"replica": self.cluster.replica_id, "sessions": opened}
            await self.cluster.notify(SESSIONS, json.dumps(notice))
        return {}

    async def _opened_elsewhere(self, payload: str) -> None:
        """Sessions another replica opened: a device's older session here is replaced, as if
        the newer one had opened here (one session per device, across replicas)."""
        try:
            notice = json.loads(payload)
            if self.cluster is None or notice["replica"] == self.cluster.replica_id:
                return
            opened = [(str(device_id), float(at)) for device_id, at in notice["sessions"]]
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed session notice: %.100r", payload)
            return
        for device_id, opened_at in opened:
            conn = self._sessions.get(device_id)
            if conn is not None and conn.session.is_open and conn.opened_at < opened_at:
                log.info("device %s opened a session on another replica: %s replaced",
                         device_id, conn.session_id)  # fmt: skip
                self._replace(conn)

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


def _now() -> datetime:
    return datetime.now(UTC)
