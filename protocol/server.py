"""The server end of a session: version negotiation, challenge, proof checks, request tracking.

The driver feeds frames in and acts on events:
- `AuthRequested(device_id)`: look the device up, then `accept(public_key)` or `refuse(code)`;
- `EnrollmentRequested`: check the one-time token, then `complete_enrollment(...)` or `refuse`;
- `EscalationReceived`, `FetchReceived`: answer with `send(Delta/Result/Error/Cancel)` or
  `send_chunk(...)`; every request ends with exactly one terminal frame;
- `FeedbackReceived`, `ReportReceived`, `UpdateStatusReceived`: store, then `send(Ack)`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from enum import StrEnum
from typing import ClassVar, Literal

from protocol.auth import SUPPORTED_VERSIONS, negotiate_version, verify_proof
from protocol.errors import CloseCode, ErrorCode, SessionStateError
from protocol.events import (
    AuthRequested,
    BinaryFrame,
    CancelRequested,
    EnrollmentRequested,
    EscalationReceived,
    FeedbackReceived,
    FetchReceived,
    GoodbyeReceived,
    HelloReceived,
    ReportReceived,
    UpdateStatusReceived,
)
from protocol.messages import (
    Auth,
    Cancel,
    Challenge,
    Chunk,
    Delta,
    Enroll,
    Enrolled,
    Error,
    Escalate,
    Feedback,
    Fetch,
    Goodbye,
    Hello,
    Message,
    Report,
    Result,
    UpdateStatus,
    Welcome,
    make_error,
)
from protocol.parts import (
    KeyEndorsement,
    Limits,
    ServerCapability,
)
from protocol.session import Flight, Session
from shared.errors import SignatureError
from shared.keys import VerifyKey, b64url_encode

__all__ = ["DEFAULT_LIMITS", "ServerSession", "ServerState"]

DEFAULT_LIMITS = Limits(
    max_message_bytes=1 << 20, max_in_flight=8, max_requests_per_minute=600, heartbeat_s=20
)

_CLOSE_FOR: dict[ErrorCode, CloseCode] = {
    ErrorCode.UNSUPPORTED_VERSION: CloseCode.UNSUPPORTED_VERSION,
    ErrorCode.AUTH_TIMEOUT: CloseCode.AUTH_TIMEOUT,
    ErrorCode.SHUTTING_DOWN: CloseCode.GOING_AWAY,
    ErrorCode.INTERNAL_ERROR: CloseCode.INTERNAL_ERROR,
}


class ServerState(StrEnum):
    AWAITING_HELLO = "awaiting_hello"
    CHALLENGED = "challenged"
    VERIFYING = "verifying"
    OPEN = "open"
    CLOSED = "closed"


class ServerSession(Session):
    """The cloud's end of one connection."""

    own_direction: ClassVar[Literal["server"]] = "server"

    def __init__(
        self,
        *,
        server_id: str,
        limits: Limits = DEFAULT_LIMITS,
        versions: tuple[str, ...] = SUPPORTED_VERSIONS,
        capabilities: tuple[ServerCapability, ...] = ("stream", "cancel", "feedback", "report"),
        proof_window_s: int = 120,
        clock: Callable[[], float] = time.time,
        nonce_bytes: Callable[[int], bytes] = secrets.token_bytes,
        max_violations: int = 16,
        signing_keys: tuple[KeyEndorsement, ...] = (),
    ) -> None:
        super().__init__(max_message_bytes=limits.max_message_bytes, max_violations=max_violations)
        self.server_id = server_id
        self.signing_keys = signing_keys
        """The rotations of the bundle-signing key, told in `welcome` (see `Welcome`)."""
        self.limits = limits
        self.versions = versions
        self.capabilities = capabilities
        self.proof_window_s = proof_window_s
        self._clock = clock
        self._nonce_bytes = nonce_bytes
        self.state = ServerState.AWAITING_HELLO
        self.hello: Hello | None = None
        self.version: str | None = None
        self.nonce: str | None = None
        self.device_id: str | None = None
        self._proof: Auth | Enroll | None = None

    @property
    def is_open(self) -> bool:
        return self.state is ServerState.OPEN

    # --- decisions the driver makes -------------------------------------------------------

    def accept(self, key: VerifyKey, *, session_id: str) -> bool:
        """Finish `AuthRequested`: verify the proof with the device's key; welcome or refuse."""
        proof = self._proof
        if self.state is not ServerState.VERIFYING or not isinstance(proof, Auth):
            raise SessionStateError("accept() without a pending `auth`")
        assert self.nonce is not None
        try:
            verify_proof(
                key, proof.signature, "auth", self.server_id, self.nonce, proof.timestamp,
                proof.device_id,
            )  # fmt: skip
        except SignatureError:
            self.refuse(ErrorCode.BAD_SIGNATURE, "proof signature does not verify")
            return False
        self._welcome(proof.device_id, session_id)
        return True

    def complete_enrollment(
        self, device_id: str, server_key: VerifyKey, *, session_id: str
    ) -> None:
        """Finish `EnrollmentRequested`: the token was good and the device is stored."""
        if self.state is not ServerState.VERIFYING or not isinstance(self._proof, Enroll):
            raise SessionStateError("complete_enrollment() without a pending `enroll`")
        self._queue(Enrolled(device_id=device_id, server_key=server_key.b64()))
        self._welcome(device_id, session_id)

    def refuse(self, code: ErrorCode, message: str) -> None:
        """Send a typed error and close: a failed authentication, a timeout, a shutdown."""
        if self.closed:
            return
        self._queue(make_error(code, message))
        self.close(_CLOSE_FOR.get(code, CloseCode.POLICY_VIOLATION), message[:120])

    # --- what the driver sends ------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Queue a message, checking it against the session's state and request tracking."""
        self._check_can_send(message)
        match message:
            case Challenge() | Welcome() | Enrolled():
                raise SessionStateError(f"`{message.type}` is sent by the session itself")
            case Chunk():
                raise SessionStateError("use send_chunk() to send a `chunk` with its data")
            case Delta():
                flight = self._flight_for(message.request_id, "escalate")
                if message.seq != flight.next_seq:
                    raise SessionStateError(
                        f"delta seq {message.seq} for {message.request_id}, "
                        f"expected {flight.next_seq}"
                    )
                flight.next_seq += 1
            case Result():
                self._flight_for(message.request_id, "escalate")
                del self._flights[message.request_id]
            case Error(request_id=str(request_id)) | Cancel(request_id=request_id):
                if request_id not in self._flights:
                    raise SessionStateError(f"request {request_id} is not in flight")
                del self._flights[request_id]
            case Goodbye():
                self._queue(message)
                replaced = message.reason == "session_replaced"
                self.close(CloseCode.SESSION_REPLACED if replaced else CloseCode.GOING_AWAY,
                           message.reason)  # fmt: skip
                return
        self._queue(message)

    def send_chunk(self, header: Chunk, data: bytes) -> None:
        """Queue a `chunk` header and its binary frame; this ends the fetch."""
        self._check_can_send(header)
        self._flight_for(header.request_id, "fetch")
        if len(data) != header.length:
            raise SessionStateError(f"chunk header says {header.length} bytes, got {len(data)}")
        if len(data) > self.max_message_bytes:
            raise SessionStateError("chunk larger than the session's frame limit")
        del self._flights[header.request_id]
        self._queue(header)
        self._frames.append(BinaryFrame(data))

    # --- incoming -------------------------------------------------------------------------

    def _handle(self, message: Message) -> None:
        match message:
            case Hello():
                self._on_hello(message)
            case Auth() | Enroll():
                self._on_proof(message)
            case Goodbye():
                self._events.append(GoodbyeReceived(message))
                self.close(CloseCode.NORMAL, message.reason)
            case Error():
                self._peer_error(message)
            case Escalate() | Fetch():
                self._on_request(message)
            case Cancel():
                flight = self._flights.get(message.request_id)
                # A cancel racing the final frame finds nothing in flight and is ignored.
                if flight is not None and not flight.cancelled:
                    flight.cancelled = True
                    self._events.append(CancelRequested(message.request_id))
            case Feedback():
                self._events.append(FeedbackReceived(message))
            case Report():
                self._events.append(ReportReceived(message))
            case UpdateStatus():
                self._events.append(UpdateStatusReceived(message))
            case _:  # pragma: no cover - every client message is matched above
                self._violation(ErrorCode.UNEXPECTED_MESSAGE, f"`{message.type}` not expected")

    def _on_hello(self, hello: Hello) -> None:
        if self.state is not ServerState.AWAITING_HELLO:
            self._violation(ErrorCode.UNEXPECTED_MESSAGE, "`hello` was already received")
            return
        version = negotiate_version(hello.versions, self.versions)
        if version is None:
            self._violation(
                ErrorCode.UNSUPPORTED_VERSION,
                f"no common protocol version; this server speaks {', '.join(self.versions)}",
                data={"supported": list(self.versions)},
                close=CloseCode.UNSUPPORTED_VERSION,
            )
            return
        self.hello, self.version = hello, version
        self.nonce = b64url_encode(self._nonce_bytes(32))
        self.state = ServerState.CHALLENGED
        self._queue(
            Challenge(
                version=version,
                server_id=self.server_id,
                nonce=self.nonce,
                server_time=int(self._clock()),
                proof_window_s=self.proof_window_s,
            )
        )
        self._events.append(HelloReceived(hello))

    def _on_proof(self, proof: Auth | Enroll) -> None:
        if self.state is not ServerState.CHALLENGED:
            self._violation(ErrorCode.UNEXPECTED_MESSAGE, f"`{proof.type}` not expected now")
            return
        assert self.hello is not None and self.nonce is not None
        if proof.nonce != self.nonce:
            self._violation(ErrorCode.PROOF_REPLAYED, "proof was made for another connection")
            return
        if abs(proof.timestamp - self._clock()) > self.proof_window_s:
            self._violation(ErrorCode.PROOF_EXPIRED, "proof timestamp outside the window")
            return
        if isinstance(proof, Auth):
            if self.hello.device_id is not None and self.hello.device_id != proof.device_id:
                self._violation(ErrorCode.AUTH_FAILED, "`auth` names another device than `hello`")
                return
            self._proof, self.state = proof, ServerState.VERIFYING
            self._events.append(AuthRequested(proof.device_id))
            return
        try:
            key = VerifyKey.from_b64(proof.public_key)
            verify_proof(
                key, proof.signature, "enroll", self.server_id, self.nonce, proof.timestamp,
                proof.public_key,
            )  # fmt: skip
        except SignatureError:
            self._violation(ErrorCode.BAD_SIGNATURE, "enrollment proof does not verify")
            return
        self._proof, self.state = proof, ServerState.VERIFYING
        self._events.append(EnrollmentRequested(proof))

    def _on_request(self, request: Escalate | Fetch) -> None:
        rid = request.request_id
        if rid in self._flights:
            # No request_id on this error: the original request is still running.
            self._violation(
                ErrorCode.DUPLICATE_REQUEST,
                f"request id {rid} is already in flight",
                data={"request_id": rid},
            )
            return
        if len(self._flights) >= self.limits.max_in_flight:
            self._violation(
                ErrorCode.TOO_MANY_IN_FLIGHT,
                f"more than {self.limits.max_in_flight} requests in flight",
                request_id=rid,
            )
            return
        if isinstance(request, Escalate):
            self._flights[rid] = Flight("escalate")
            self._events.append(EscalationReceived(request))
        else:
            self._flights[rid] = Flight("fetch")
            self._events.append(FetchReceived(request))

    # --- helpers --------------------------------------------------------------------------

    def _welcome(self, device_id: str, session_id: str) -> None:
        assert self.version is not None
        self.device_id = device_id
        self._proof = None
        self.state = ServerState.OPEN
        self._queue(
            Welcome(
                version=self.version,
                session_id=session_id,
                server_id=self.server_id,
                device_id=device_id,
                capabilities=list(self.capabilities),
                limits=self.limits,
                signing_keys=list(self.signing_keys),
            )
        )

    def _flight_for(self, request_id: str, kind: str) -> Flight:
        flight = self._flights.get(request_id)
        if flight is None or flight.kind != kind:
            raise SessionStateError(f"no {kind} request {request_id} in flight")
        return flight

    def _on_closed(self) -> None:
        self.state = ServerState.CLOSED
