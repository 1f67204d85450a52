"""`CloudLink`: the device's connection to the cloud agent.

A websockets client driving `protocol.ClientSession`. It enrolls once with a one-time token
(persisting the device id and pinning the cloud's bundle-signing key), authenticates on every
connection, and reconnects with capped exponential backoff and full jitter (no sooner than a
cloud's `goodbye` said). Escalations are
correlated by request id; one that cannot be answered (link down, deadline, `overloaded`,
`rate_limited`, connection lost) raises `CloudUnavailable`, so the caller answers locally.
Messages that must arrive (feedback, reports, update statuses) go through the `Outbox` and are
resent until acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl as ssl_module
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from edge_agent.errors import EdgeAgentError
from edge_agent.outbox import Outbox
from protocol import (
    SUBPROTOCOL,
    AckReceived,
    BaseModelRef,
    Cancel,
    Chunk,
    ChunkReceived,
    ClientSession,
    CloseCode,
    CloseFrame,
    DeltaReceived,
    DeviceCredentials,
    EnrollmentCompleted,
    EnrollmentCredentials,
    Escalate,
    Feedback,
    Fetch,
    FrameTooLarge,
    GoodbyeReceived,
    KeyEndorsement,
    Limits,
    Message,
    PeerError,
    Report,
    RequestCancelled,
    RequestFailed,
    Result,
    ResultReceived,
    SessionClosed,
    UpdateOffer,
    UpdateOffered,
    UpdateStatus,
    Welcomed,
    check_endpoint,
    follow_key_rotation,
)
from shared.errors import SignatureError
from shared.ids import new_request_id
from shared.keys import SigningKey

__all__ = ["CloudLink", "CloudUnavailable", "DeviceIdentity", "LinkState", "read_identity"]

log = logging.getLogger("edgeloop.edge.link")

SDK = "edgeloop-python/0.1.0"
_OUTBOX_MESSAGE: TypeAdapter[Feedback | Report | UpdateStatus] = TypeAdapter(
    Feedback | Report | UpdateStatus
)


class CloudUnavailable(EdgeAgentError):
    """The cloud cannot answer this request now; `reason` is a router-style code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class LinkState(StrEnum):
    DOWN = "down"
    CONNECTING = "connecting"
    UP = "up"


@dataclass
class DeviceIdentity:
    """What enrollment gave the device: its id, the cloud's key it pinned (base64), and the URL
    it enrolled at (the cloud to connect to when none is configured)."""

    device_id: str | None
    server_key: str | None
    cloud_url: str | None = None
    """None in identities written before edgeloop kept it."""


def read_identity(state_dir: Path) -> DeviceIdentity:
    """The identity the cloud gave a device at enrollment (its id, the server's key it pinned,
    where it enrolled); none before it. A file that is there but unreadable is an error, not a
    reason to act as a new device (it is written whole, by rename, so only something outside
    edgeloop damages it)."""
    path = state_dir / "identity.json"
    if not path.exists():
        return DeviceIdentity(None, None)
    try:
        data = json.loads(path.read_text())
        identity = DeviceIdentity(data["device_id"], data["server_key"], data.get("cloud_url"))
        if not all(isinstance(v, str) for v in (identity.device_id, identity.server_key)):
            raise ValueError("device_id and server_key must be strings")
        if identity.cloud_url is not None:
            check_endpoint(identity.cloud_url)
        return identity
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EdgeAgentError(
            f"{path} is damaged ({type(exc).__name__}: {exc}); restore it from a backup, or "
            "delete it and enroll this device again"
        ) from None


class CloudLink:
    """Keeps a session with the cloud open and carries requests over it."""

    def __init__(
        self,
        url: str,
        state_dir: str | Path,
        *,
        enrollment_token: str | None = None,
        device_name: str | None = None,
        base_model: BaseModelRef | None = None,
        outbox: Outbox | None = None,
        ssl: ssl_module.SSLContext | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        try:
            self.url = check_endpoint(url)
        except ValueError as exc:
            raise EdgeAgentError(f"cloud URL {url!r}: {exc}") from None
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.key = SigningKey.load_or_create(self.state_dir / "device.key")
        if enrollment_token is not None:
            # A token the `enroll` message cannot carry is refused now (InvalidMessage), not
            # in the middle of a handshake.
            EnrollmentCredentials(enrollment_token, self.key, device_name)
        self.enrollment_token = enrollment_token
        self.device_name = device_name
        self.base_model = base_model
        self.outbox = outbox
        self.ssl = ssl
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.state = LinkState.DOWN
        self.limits: Limits | None = None
        self.identity = read_identity(self.state_dir)
        self._ws: ClientConnection | None = None
        self._session: ClientSession | None = None
        self._waiters: dict[str, asyncio.Queue[Any]] = {}
        self._write_lock = asyncio.Lock()
        self._up = asyncio.Event()
        self._outbox_kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._refused: str | None = None
        self._retry_after: int | None = None
        """Seconds the cloud said reconnecting is pointless for (`goodbye.retry_after_s`)."""
        self.last_failure: str | None = None
        """Why the last connection attempt failed or ended (None once a session opens)."""
        self.last_error: BaseException | None = None
        """The exception that ended the last connection attempt, if one did (None once a
        session opens). An `ssl.SSLCertVerificationError` says the cloud's certificate is not
        trusted: the link's `ssl` context needs the CA that signed it."""
        self.adapter_version: int | None = None
        """Announced in `hello`; the updater sets it when a bundle is applied."""
        self.on_offer: Callable[[UpdateOffer], Coroutine[Any, Any, object]] | None = None
        """Called (in a task of its own) with each `update_offer` the cloud sends."""
        self._offer_task: asyncio.Task[object] | None = None

    # --- identity ---------------------------------------------------------------------------

    def _save_identity(self) -> None:
        path = self.state_dir / "identity.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"device_id": self.identity.device_id,
                                   "server_key": self.identity.server_key,
                                   "cloud_url": self.identity.cloud_url}))  # fmt: skip
        tmp.replace(path)

    def _follow_key_rotation(self, chain: list[KeyEndorsement]) -> None:
        """Move the pinned cloud key along the rotations `welcome` tells of, each checked
        against the key before it; a chain that does not check out moves nothing (updates
        signed by any other key stay refused)."""
        pinned = self.identity.server_key
        if pinned is None:
            return
        try:
            current = follow_key_rotation(pinned, chain)
        except SignatureError as exc:
            log.warning("the cloud's key rotation does not verify (%s); the pinned key stays", exc)
            return
        if current != pinned:
            self.identity = replace(self.identity, server_key=current)
            self._save_identity()
            log.info("the cloud's signing key was rotated: pinned %s now", current)

    @property
    def enrolled(self) -> bool:
        return self.identity.device_id is not None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (and reconnect) in the background. Raises `EdgeAgentError` at once when
        the device is neither enrolled nor given a token: no connection could succeed."""
        if not self.enrolled and self.enrollment_token is None:
            raise EdgeAgentError(
                f"this device is not enrolled (no identity in {self.state_dir}): enroll it with "
                "a token from `edgeloop cloud enroll-token` (`edgeloop edge enroll`, or "
                "CloudLink(enrollment_token=...))"
            )
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="cloud-link")

    async def stop(self) -> None:
        if self._offer_task is not None:
            self._offer_task.cancel()
            await asyncio.gather(self._offer_task, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._ws is not None:
            await self._ws.close()
        self._set_down()

    async def wait_up(self, timeout: float) -> bool:
        """True once a session is open; False after `timeout`, or as soon as the link stops
        for good (the cloud refused the device: `refused`)."""
        up = asyncio.ensure_future(self._up.wait())
        # A link that already stopped for good answers at once (its task is done).
        running = [self._task] if self._task is not None else []
        try:
            await asyncio.wait([up, *running], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            up.cancel()
        return self._up.is_set()

    @property
    def refused(self) -> str | None:
        """Why the cloud refused this device for good (``unknown_device``, ``device_revoked``,
        ``invalid_enrollment_token``, or ``session_replaced``: another connection under the
        same identity took over); the link stops reconnecting."""
        return self._refused

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._connect_once()
                attempt = 0
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError) as exc:
                self.last_failure, self.last_error = _describe(exc), exc
                if isinstance(exc, ssl_module.SSLCertVerificationError):
                    log.warning("the cloud's certificate is not trusted: %s", exc.verify_message)
                else:
                    log.info("cloud link down: %s", type(exc).__name__)
            except EdgeAgentError as exc:
                # Our own refusal to go on (nothing a retry changes): stop, and say why.
                self.last_failure, self.last_error = _describe(exc), exc
                log.error("cloud link stopped: %s", exc)
                return
            except Exception as exc:
                # A bug must not end the link in silence: say so, and keep trying.
                self.last_failure, self.last_error = _describe(exc), exc
                log.exception("cloud link failed")
            finally:
                self._set_down()
            if self._refused is not None:
                log.warning("cloud refused this device (%s); not reconnecting", self._refused)
                return
            attempt += 1
            cap = min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(attempt, 16))
            delay = random.uniform(0, cap)  # full jitter
            if wait := self._retry_after:
                # The cloud said when to come back (a restart): its devices spread over as
                # long again after that, rather than all arriving at once.
                delay = wait + random.uniform(0, wait)
            self._retry_after = None
            await asyncio.sleep(delay)

    async def _connect_once(self) -> None:
        if self.identity.device_id is not None:
            credentials: DeviceCredentials | EnrollmentCredentials = DeviceCredentials(
                self.identity.device_id, self.key
            )
        elif self.enrollment_token is not None:
            credentials = EnrollmentCredentials(self.enrollment_token, self.key, self.device_name)
        else:
            raise EdgeAgentError("not enrolled and no enrollment token")
        self.state = LinkState.CONNECTING
        # No `ssl` at all for the system's CAs: websockets refuses ssl=None for a wss:// URL.
        tls: dict[str, Any] = {} if self.ssl is None else {"ssl": self.ssl}
        async with connect(
            self.url, subprotocols=[SUBPROTOCOL], proxy=None, open_timeout=10, **tls,  # type: ignore[list-item]
        ) as ws:  # fmt: skip
            self._ws = ws
            session = ClientSession(
                credentials,
                sdk=SDK,
                base_model=self.base_model,
                adapter_version=self.adapter_version,
                capabilities=("stream", "cancel", "feedback", "report", "updates"),
            )
            self._session = session
            session.start()
            await self._flush()
            drain = asyncio.create_task(self._drain_outbox())
            try:
                async for data in ws:
                    if isinstance(data, str):
                        session.receive_text(data)
                    else:
                        session.receive_binary(data)
                    self._dispatch(session)
                    await self._flush()
                    if session.closed:
                        break
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else 1006
                session.receive_close(code, "")
                self._dispatch(session)
            finally:
                drain.cancel()
                await asyncio.gather(drain, return_exceptions=True)
                if not session.closed:
                    session.receive_close(ws.close_code or 1006, "")
                    self._dispatch(session)

    def _dispatch(self, session: ClientSession) -> None:
        for event in session.events_received():
            match event:
                case EnrollmentCompleted(device_id=device_id, server_key=server_key):
                    self.identity = DeviceIdentity(device_id, server_key, self.url)
                    self._save_identity()
                case Welcomed(welcome=welcome):
                    if welcome.signing_keys:
                        self._follow_key_rotation(welcome.signing_keys)
                    self.state, self.limits = LinkState.UP, welcome.limits
                    self.last_failure = self.last_error = None
                    self._up.set()
                    self._outbox_kick.set()
                case DeltaReceived(delta=delta):
                    self._deliver(delta.request_id, delta.text)
                case ResultReceived(result=result):
                    self._deliver(result.request_id, result)
                case RequestFailed(request_id=rid, error=error):
                    self._deliver(rid, CloudUnavailable(_reason(error.name), error.message))
                case RequestCancelled(message=message):
                    self._deliver(message.request_id, CloudUnavailable("cloud.cancelled"))
                case ChunkReceived(header=header, data=data):
                    self._deliver(header.request_id, (header, data))
                case UpdateOffered(offer=offer):
                    self._start_offer(offer)
                case AckReceived(ack=ack):
                    if self.outbox is not None:
                        self.outbox.ack(ack.idempotency_key)
                case PeerError(error=error):
                    # At authentication, or later: a revocation ends an open session too.
                    if error.name in (
                        "unknown_device", "device_revoked", "invalid_enrollment_token",
                    ):  # fmt: skip
                        self._refused = error.name
                        self.last_failure, self.last_error = f"refused: {error.name}", None
                case GoodbyeReceived(message=goodbye):
                    self._retry_after = goodbye.retry_after_s
                case SessionClosed(code=code):
                    if code == CloseCode.SESSION_REPLACED:
                        # Another connection under this device's identity took over (a second
                        # process, a copied identity file): reconnecting would take it back.
                        self._refused = "session_replaced"
                        self.last_failure, self.last_error = "replaced by a newer session", None
                    self._set_down()

    def _deliver(self, request_id: str, item: Any) -> None:
        queue = self._waiters.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    def _set_down(self) -> None:
        self.state = LinkState.DOWN
        self._up.clear()
        self._session = None
        self._ws = None
        for queue in self._waiters.values():
            queue.put_nowait(CloudUnavailable("link.down", "connection lost"))

    async def _flush(self) -> None:
        session, ws = self._session, self._ws
        if session is None or ws is None or not session.has_data_to_send:
            return
        async with self._write_lock:
            for frame in session.data_to_send():
                if isinstance(frame, CloseFrame):
                    await ws.close(int(frame.code), frame.reason)
                    return
                await ws.send(frame.data)

    async def _send(self, message: Message) -> None:
        if self._session is None or not self._session.is_open:
            raise CloudUnavailable("link.down")
        self._session.send(message)
        await self._flush()

    # --- requests ---------------------------------------------------------------------------

    async def escalate(self, request: Escalate) -> AsyncGenerator[str | Result, None]:
        """Text pieces (for streaming requests), then the `Result`; or `CloudUnavailable`."""
        session = self._session
        if session is None or not session.is_open:
            raise CloudUnavailable("link.down")
        if not session.can_start_request():
            raise CloudUnavailable("cloud.backpressure", "in-flight limit reached")
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._waiters[request.request_id] = queue
        ended = False
        try:
            try:
                await self._send(request)
            except FrameTooLarge as exc:
                # Not sent: the server would close the connection over it.
                raise CloudUnavailable("request.too_large", str(exc)) from None
            async with asyncio.timeout(request.deadline_ms / 1000):
                while not ended:
                    item = await queue.get()
                    if isinstance(item, CloudUnavailable):
                        raise item
                    ended = isinstance(item, Result)
                    yield item
        except TimeoutError:
            await self._cancel(request.request_id)
            raise CloudUnavailable("cloud.deadline") from None
        except (asyncio.CancelledError, GeneratorExit):
            # The caller gave up: tell the cloud, unless its answer is all here.
            if not ended:
                await asyncio.shield(self._cancel(request.request_id))
            raise
        finally:
            self._waiters.pop(request.request_id, None)

    async def fetch(
        self, version: int, file: str, offset: int, length: int, *, timeout_s: float = 60.0
    ) -> tuple[Chunk, bytes]:
        """One range of a bundle file over the protocol's fetch; `CloudUnavailable` on failure."""
        session = self._session
        if session is None or not session.is_open:
            raise CloudUnavailable("link.down")
        request = Fetch(
            request_id=new_request_id(), version=version, file=file, offset=offset, length=length
        )
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._waiters[request.request_id] = queue
        try:
            await self._send(request)
            async with asyncio.timeout(timeout_s):
                item = await queue.get()
        except TimeoutError:
            raise CloudUnavailable("cloud.deadline", "fetch timed out") from None
        finally:
            self._waiters.pop(request.request_id, None)
        if isinstance(item, CloudUnavailable):
            raise item
        header, data = item
        return header, data

    async def wait_outbox_empty(self, timeout: float) -> bool:
        """Wait until the cloud acknowledged everything queued (False on timeout)."""
        if self.outbox is None:
            return True
        try:
            async with asyncio.timeout(timeout):
                while len(self.outbox):
                    self._outbox_kick.set()
                    await asyncio.sleep(0.05)
            return True
        except TimeoutError:
            return False

    def _start_offer(self, offer: UpdateOffer) -> None:
        # One update at a time; an offer arriving meanwhile is offered again on reconnect.
        if self.on_offer is None or (self._offer_task and not self._offer_task.done()):
            return
        self._offer_task = asyncio.create_task(self.on_offer(offer))

    async def _cancel(self, request_id: str) -> None:
        try:
            await self._send(Cancel(request_id=request_id, reason="device stopped waiting"))
        except (CloudUnavailable, ConnectionClosed):
            pass

    # --- reliable messages --------------------------------------------------------------------

    def queue_reliable(self, message: Feedback | Report | UpdateStatus) -> None:
        """Persist in the outbox (durable on return); sent now if the link is up, else later."""
        if self.outbox is None:
            raise EdgeAgentError("this link has no outbox")
        self.outbox.put(message.type, message.idempotency_key, message.model_dump(mode="json"))
        self._outbox_kick.set()

    async def _drain_outbox(self) -> None:
        if self.outbox is None:
            return
        while True:
            await self._outbox_kick.wait()
            self._outbox_kick.clear()
            if self._session is None or not self._session.is_open:
                continue
            for entry in self.outbox.pending(limit=100):
                try:
                    message = _OUTBOX_MESSAGE.validate_python(entry.payload)
                except ValidationError:
                    log.warning("dropping an unreadable outbox entry (%s)", entry.kind)
                    self.outbox.ack(entry.idempotency_key)
                    continue
                try:
                    await self._send(message)
                except CloudUnavailable:
                    break
                except FrameTooLarge as exc:
                    # The server will never take it, and it would hold up everything queued
                    # after it.
                    log.warning("dropping an outbox entry the cloud cannot take: %s", exc)
                    self.outbox.ack(entry.idempotency_key)


def _reason(error_name: str) -> str:
    return {
        "overloaded": "cloud.overloaded",
        "rate_limited": "cloud.rate_limited",
        "deadline_exceeded": "cloud.deadline",
        "connection_lost": "link.down",
        "shutting_down": "cloud.shutting_down",
    }.get(error_name, f"cloud.{error_name}")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
