"""The device end of a session: hello, proof, and correlation of replies to requests.

The driver calls `start()` once the socket is open, writes `data_to_send()` after every call,
and acts on events: `EnrollmentCompleted` (persist the id, pin the key), `Welcomed`, then
replies to its requests (`DeltaReceived`, `ResultReceived`, `RequestFailed`,
`RequestCancelled`, `ChunkReceived`), `AckReceived` and `UpdateOffered`. When the connection
drops, every request still in flight ends with `RequestFailed(connection_lost)`, so no caller
is left waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Literal

from pydantic import TypeAdapter, ValidationError

from protocol.auth import SUPPORTED_VERSIONS, sign_proof
from protocol.errors import (
    CloseCode,
    ErrorCode,
    FrameTooLarge,
    InvalidMessage,
    SessionStateError,
)
from protocol.events import (
    AckReceived,
    ChunkReceived,
    DeltaReceived,
    EnrollmentCompleted,
    GoodbyeReceived,
    RequestCancelled,
    RequestFailed,
    ResultReceived,
    TextFrame,
    UpdateOffered,
    Welcomed,
)
from protocol.messages import (
    Ack,
    Auth,
    Cancel,
    Challenge,
    Chunk,
    Delta,
    Enroll,
    Enrolled,
    Error,
    Escalate,
    Fetch,
    Goodbye,
    Hello,
    Message,
    Result,
    UpdateOffer,
    Welcome,
    encode,
    make_error,
)
from protocol.parts import (
    BaseModelRef,
    Capability,
    DeviceResources,
    EnrollmentToken,
    Limits,
    ShortText,
)
from protocol.session import DEFAULT_MAX_MESSAGE_BYTES, Flight, Session
from shared.keys import SigningKey

__all__ = ["ClientSession", "ClientState", "DeviceCredentials", "EnrollmentCredentials"]


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    """An enrolled device: its id and private key."""

    device_id: str
    key: SigningKey


@dataclass(frozen=True, slots=True)
class EnrollmentCredentials:
    """A device that enrolls on this connection with a one-time token. A token or name the
    `enroll` message could not carry is refused here (`InvalidMessage`), not mid-handshake."""

    token: str
    key: SigningKey
    name: str | None = None

    def __post_init__(self) -> None:
        for field, adapter, value in (
            ("token", _TOKEN, self.token),
            ("name", _NAME, self.name),
        ):
            try:
                adapter.validate_python(value)
            except ValidationError as exc:
                problem = exc.errors(include_url=False)[0]["msg"]
                raise InvalidMessage(f"enrollment {field}: {problem}") from None


_TOKEN: TypeAdapter[str] = TypeAdapter(EnrollmentToken)
_NAME: TypeAdapter[str | None] = TypeAdapter(ShortText | None)


class ClientState(StrEnum):
    IDLE = "idle"
    HELLO_SENT = "hello_sent"
    PROOF_SENT = "proof_sent"
    OPEN = "open"
    CLOSED = "closed"


class ClientSession(Session):
    """The device's end of one connection."""

    own_direction: ClassVar[Literal["client"]] = "client"

    def __init__(
        self,
        credentials: DeviceCredentials | EnrollmentCredentials,
        *,
        sdk: str,
        versions: tuple[str, ...] = SUPPORTED_VERSIONS,
        base_model: BaseModelRef | None = None,
        adapter_version: int | None = None,
        capabilities: tuple[Capability, ...] = ("stream", "cancel", "feedback", "report"),
        resources: DeviceResources | None = None,
        clock: Callable[[], float] = time.time,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_violations: int = 16,
    ) -> None:
        super().__init__(max_message_bytes=max_message_bytes, max_violations=max_violations)
        self.credentials = credentials
        self._hello = Hello(
            versions=list(versions),
            device_id=credentials.device_id if isinstance(credentials, DeviceCredentials) else None,
            sdk=sdk,
            base_model=base_model,
            adapter_version=adapter_version,
            capabilities=list(capabilities),
            resources=resources,
        )
        self._clock = clock
        self.state = ClientState.IDLE
        self.version: str | None = None
        self.server_id: str | None = None
        self.device_id: str | None = self._hello.device_id
        self.limits: Limits | None = None
        self.welcome: Welcome | None = None
        self._enrolled = False
        self._pending_chunk: Chunk | None = None

    @property
    def is_open(self) -> bool:
        return self.state is ClientState.OPEN

    def start(self) -> None:
        """Queue `hello`; call once, right after the socket opens."""
        if self.state is not ClientState.IDLE:
            raise SessionStateError("start() called twice")
        self.state = ClientState.HELLO_SENT
        self._queue(self._hello)

    def can_start_request(self) -> bool:
        """True when a new `escalate` or `fetch` stays within the server's in-flight limit."""
        return (
            self.is_open
            and self.limits is not None
            and len(self._flights) < self.limits.max_in_flight
        )

    # --- what the driver sends ------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Queue a message, checking it against the session's state and the server's limits.

        Raises `SessionStateError` for a message the session cannot send now, and
        `FrameTooLarge` for one larger than the server takes (which would close the
        connection, and with it every request in flight)."""
        self._check_can_send(message)
        frame = encode(message)
        # A character is at most four bytes: only a frame near the limit is measured.
        if len(frame) * 4 > self.max_message_bytes:
            size = len(frame.encode("utf-8"))
            if size > self.max_message_bytes:
                raise FrameTooLarge(
                    f"`{message.type}` is {size} bytes encoded; "
                    f"the server takes at most {self.max_message_bytes}"
                )
        match message:
            case Hello() | Auth() | Enroll():
                raise SessionStateError(f"`{message.type}` is sent by the session itself")
            case Escalate() | Fetch():
                if message.request_id in self._flights:
                    raise SessionStateError(f"request id {message.request_id} is in flight")
                if not self.can_start_request():
                    raise SessionStateError("the server's in-flight limit is reached")
                kind: Literal["escalate", "fetch"] = (
                    "escalate" if isinstance(message, Escalate) else "fetch"
                )
                self._flights[message.request_id] = Flight(kind)
            case Cancel():
                flight = self._flights.get(message.request_id)
                if flight is None or flight.cancelled:
                    return  # already ended, or already cancelled: nothing to say
                # The request stays in flight until the server's terminal frame arrives.
                flight.cancelled = True
            case Goodbye():
                self._frames.append(TextFrame(frame))
                self.close(CloseCode.NORMAL, message.reason)
                return
        self._frames.append(TextFrame(frame))

    # --- incoming -------------------------------------------------------------------------

    def _handle(self, message: Message) -> None:
        if self._pending_chunk is not None:
            self._violation(
                ErrorCode.UNEXPECTED_MESSAGE, "expected the binary frame announced by `chunk`"
            )
            return
        match message:
            case Challenge():
                self._on_challenge(message)
            case Enrolled():
                if self.state is not ClientState.PROOF_SENT or not isinstance(
                    self.credentials, EnrollmentCredentials
                ) or self._enrolled:  # fmt: skip
                    self._violation(ErrorCode.UNEXPECTED_MESSAGE, "`enrolled` not expected")
                    return
                self._enrolled = True
                self.device_id = message.device_id
                self._events.append(EnrollmentCompleted(message.device_id, message.server_key))
            case Welcome():
                self._on_welcome(message)
            case Goodbye():
                self._events.append(GoodbyeReceived(message))
            case Error():
                self._on_error(message)
            case Delta():
                self._on_delta(message)
            case Result():
                flight = self._reply_flight(message.request_id, "escalate", message.type)
                if flight is not None:
                    del self._flights[message.request_id]
                    self._events.append(ResultReceived(message, flight.cancelled))
            case Cancel():
                if message.request_id in self._flights:
                    del self._flights[message.request_id]
                    self._events.append(RequestCancelled(message))
            case Chunk():
                flight = self._reply_flight(message.request_id, "fetch", message.type)
                if flight is not None:
                    self._pending_chunk = message
            case Ack():
                self._events.append(AckReceived(message))
            case UpdateOffer():
                self._events.append(UpdateOffered(message))
            case _:  # pragma: no cover - every server message is matched above
                self._violation(ErrorCode.UNEXPECTED_MESSAGE, f"`{message.type}` not expected")

    def _handle_binary(self, data: bytes) -> None:
        header = self._pending_chunk
        if header is None:
            super()._handle_binary(data)
            return
        if len(data) != header.length:
            self._violation(
                ErrorCode.INVALID_MESSAGE,
                f"chunk announced {header.length} bytes, binary frame has {len(data)}",
                request_id=None,
            )
            return
        self._pending_chunk = None
        del self._flights[header.request_id]
        self._events.append(ChunkReceived(header, data))

    def _on_challenge(self, challenge: Challenge) -> None:
        if self.state is not ClientState.HELLO_SENT:
            self._violation(ErrorCode.UNEXPECTED_MESSAGE, "`challenge` not expected now")
            return
        if challenge.version not in self._hello.versions:
            self._violation(
                ErrorCode.UNSUPPORTED_VERSION,
                f"server chose version {challenge.version}, which was not offered",
                data={"supported": list(self._hello.versions)},
                close=CloseCode.UNSUPPORTED_VERSION,
            )
            return
        self.version, self.server_id = challenge.version, challenge.server_id
        self.state = ClientState.PROOF_SENT
        timestamp = int(self._clock())
        creds = self.credentials
        if isinstance(creds, DeviceCredentials):
            signature = sign_proof(
                creds.key, "auth", challenge.server_id, challenge.nonce, timestamp, creds.device_id
            )
            self._queue(
                Auth(
                    device_id=creds.device_id,
                    nonce=challenge.nonce,
                    timestamp=timestamp,
                    signature=signature,
                )
            )
        else:
            public_key = creds.key.verify_key().b64()
            signature = sign_proof(
                creds.key, "enroll", challenge.server_id, challenge.nonce, timestamp, public_key
            )
            self._queue(
                Enroll(
                    token=creds.token,
                    public_key=public_key,
                    nonce=challenge.nonce,
                    timestamp=timestamp,
                    signature=signature,
                    name=creds.name,
                )
            )

    def _on_welcome(self, welcome: Welcome) -> None:
        enrolling = isinstance(self.credentials, EnrollmentCredentials)
        if (
            self.state is not ClientState.PROOF_SENT
            or (enrolling and not self._enrolled)
            or welcome.version != self.version
            or welcome.device_id != self.device_id
        ):
            self._violation(ErrorCode.UNEXPECTED_MESSAGE, "`welcome` does not match the session")
            return
        self.state = ClientState.OPEN
        self.welcome, self.limits = welcome, welcome.limits
        self.max_message_bytes = welcome.limits.max_message_bytes
        self._events.append(Welcomed(welcome))

    def _on_error(self, error: Error) -> None:
        if error.request_id is None:
            self._peer_error(error)
            return
        flight = self._flights.get(error.request_id)
        if flight is None:
            self._violation(
                ErrorCode.UNKNOWN_REQUEST, f"error for unknown request {error.request_id}"
            )
            return
        del self._flights[error.request_id]
        self._events.append(RequestFailed(error.request_id, error, flight.cancelled))

    def _on_delta(self, delta: Delta) -> None:
        flight = self._reply_flight(delta.request_id, "escalate", delta.type)
        if flight is None:
            return
        if delta.seq != flight.next_seq:
            self._violation(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"delta seq {delta.seq} for {delta.request_id}, expected {flight.next_seq}",
            )
            return
        flight.next_seq += 1
        if not flight.cancelled:
            self._events.append(DeltaReceived(delta))

    def _reply_flight(self, request_id: str, kind: str, type_: str) -> Flight | None:
        flight = self._flights.get(request_id)
        if flight is None or flight.kind != kind:
            self._violation(
                ErrorCode.UNKNOWN_REQUEST, f"`{type_}` for unknown request {request_id}"
            )
            return None
        return flight

    def _on_closed(self) -> None:
        self.state = ClientState.CLOSED
        self._pending_chunk = None
        for request_id, flight in self._flights.items():
            error = make_error(
                ErrorCode.CONNECTION_LOST,
                "the connection closed before the request ended",
                request_id=request_id,
            )
            self._events.append(RequestFailed(request_id, error, flight.cancelled))
