"""The sans-I/O core shared by both ends of a session.

A session takes frames in (`receive_text`, `receive_binary`, `receive_close`), and hands back
events (`events_received`) and frames to write (`data_to_send`). It does no I/O, keeps no
timers and never blocks: the cloud's server and the edge's link are thin drivers around it,
so both sides enforce the same rules by construction.

Rules the base enforces on every frame, before any state changes:
- frames larger than `max_message_bytes` close the connection with 1009;
- undecodable frames, unknown types and invalid fields get a typed `error`;
- a message the peer's role may not send, or not in the current state, gets
  `unexpected_message`;
- before authentication any violation also closes the connection (1008); after it, a peer that
  keeps violating (more than `max_violations`) is closed with 4000.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import JsonValue

from protocol.errors import CloseCode, DecodeError, ErrorCode, SessionStateError
from protocol.events import (
    CloseFrame,
    Event,
    Frame,
    PeerError,
    ProtocolViolation,
    SessionClosed,
    TextFrame,
)
from protocol.messages import Error, Message, decode, encode, make_error

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "Session"]

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20

RequestKind = Literal["escalate", "fetch"]


@dataclass(slots=True)
class Flight:
    """A request in flight, as a session tracks it."""

    kind: RequestKind
    next_seq: int = 0
    cancelled: bool = False


class Session:
    """State and rules common to `ServerSession` and `ClientSession`."""

    own_direction: ClassVar[Literal["client", "server"]]

    def __init__(self, *, max_message_bytes: int, max_violations: int) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_violations = max_violations
        self.violations = 0
        self.close_code: int | None = None
        self._flights: dict[str, Flight] = {}
        self._events: list[Event] = []
        self._frames: list[Frame] = []

    # --- what the driver reads ------------------------------------------------------------

    def events_received(self) -> list[Event]:
        """Events since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[Frame]:
        """Frames to write since the last call, in order. A `CloseFrame` is always last."""
        frames, self._frames = self._frames, []
        return frames

    @property
    def has_data_to_send(self) -> bool:
        """Whether `data_to_send` would return any frame."""
        return bool(self._frames)

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    @property
    def is_open(self) -> bool:
        """True once the session is authenticated and until it closes."""
        raise NotImplementedError

    @property
    def in_flight_count(self) -> int:
        return len(self._flights)

    def in_flight(self, request_id: str) -> bool:
        return request_id in self._flights

    def in_flight_ids(self) -> list[str]:
        """Ids of the requests in flight, oldest first."""
        return list(self._flights)

    # --- what the driver feeds in ---------------------------------------------------------

    def receive_text(self, frame: str | bytes) -> None:
        """Feed one text frame as received from the socket."""
        if self.closed:
            return
        try:
            message = decode(frame, max_bytes=self.max_message_bytes)
        except DecodeError as exc:
            self._violation(exc.code, str(exc))
            return
        if message.direction == self.own_direction:
            self._violation(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"`{message.type}` is sent by the {self.own_direction}, not to it",
            )
            return
        if not message.session_phase and not self.is_open:
            self._violation(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"`{message.type}` before the session is authenticated",
            )
            return
        self._handle(message)

    def receive_binary(self, data: bytes) -> None:
        """Feed one binary frame as received from the socket."""
        if self.closed:
            return
        if len(data) > self.max_message_bytes:
            self._violation(
                ErrorCode.FRAME_TOO_LARGE,
                f"binary frame of {len(data)} bytes exceeds the limit of {self.max_message_bytes}",
            )
            return
        self._handle_binary(data)

    def receive_close(self, code: int, reason: str = "") -> None:
        """The socket closed (by the peer or the network)."""
        if not self.closed:
            self._mark_closed(code, reason)

    def close(self, code: CloseCode = CloseCode.NORMAL, reason: str = "") -> None:
        """Queue a close frame; the session accepts nothing more afterwards."""
        if not self.closed:
            self._frames.append(CloseFrame(code, reason))
            self._mark_closed(int(code), reason)

    # --- for subclasses -------------------------------------------------------------------

    def _handle(self, message: Message) -> None:
        raise NotImplementedError

    def _handle_binary(self, data: bytes) -> None:
        self._violation(ErrorCode.UNEXPECTED_BINARY, "binary frame without a `chunk` header")

    def _on_closed(self) -> None:
        """Hook: the session just closed; in-flight requests are still in `_flights`."""

    def _queue(self, message: Message) -> None:
        self._frames.append(TextFrame(encode(message)))

    def _check_can_send(self, message: Message) -> None:
        if self.closed:
            raise SessionStateError(f"cannot send `{message.type}`: the session is closed")
        if message.direction not in (self.own_direction, "both"):
            raise SessionStateError(f"the {self.own_direction} does not send `{message.type}`")
        if not message.session_phase and not self.is_open:
            raise SessionStateError(f"cannot send `{message.type}` before authentication")

    def _peer_error(self, error: Error) -> None:
        self._events.append(PeerError(error))

    def _violation(
        self,
        code: ErrorCode,
        detail: str,
        *,
        request_id: str | None = None,
        data: dict[str, JsonValue] | None = None,
        close: CloseCode | None = None,
    ) -> None:
        """Report bad input to the peer. Callers change no state before calling this."""
        self._events.append(ProtocolViolation(code, detail))
        self._queue(make_error(code, detail, request_id=request_id, data=data))
        if close is None:
            if code is ErrorCode.FRAME_TOO_LARGE:
                close = CloseCode.MESSAGE_TOO_BIG
            elif not self.is_open:
                close = CloseCode.POLICY_VIOLATION
            else:
                self.violations += 1
                if self.violations > self.max_violations:
                    close = CloseCode.PROTOCOL_VIOLATION
        if close is not None:
            self.close(close, detail[:120])

    def _mark_closed(self, code: int, reason: str) -> None:
        self.close_code = code
        self._on_closed()
        self._flights.clear()
        self._events.append(SessionClosed(code, reason))
