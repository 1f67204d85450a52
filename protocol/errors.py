"""Errors of the edgeloop protocol: wire error codes, WebSocket close codes, and exceptions.

Exceptions raised by `protocol`:

    ProtocolError                  root; `code` is the wire `ErrorCode` that reports it
     ├── DecodeError               a frame could not be turned into a message
     │    ├── FrameTooLarge        larger than the negotiated limit      (frame_too_large)
     │    ├── MalformedFrame       not UTF-8 JSON, or not a JSON object  (malformed_frame)
     │    ├── UnknownMessageType   a `type` this version does not define (unknown_type)
     │    └── InvalidMessage       a missing, extra or ill-typed field   (invalid_message)
     ├── SessionStateError         our own side used a session out of order (a bug in a driver)
     └── RemoteError               the peer answered with an `error` message

Wire error codes live in documented ranges (see `ErrorCode` and SPEC.md):

    1000-1099  frames and session order      1200-1299  requests
    1100-1199  authentication, enrollment    1300-1399  updates
    1900-1999  server conditions
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from shared.errors import EdgeloopError

if TYPE_CHECKING:
    from protocol.messages import Error

__all__ = [
    "CloseCode",
    "DecodeError",
    "ErrorCode",
    "ErrorInfo",
    "FrameTooLarge",
    "InvalidMessage",
    "MalformedFrame",
    "ProtocolError",
    "RemoteError",
    "SessionStateError",
    "UnknownMessageType",
    "error_info",
]


class ErrorCode(IntEnum):
    """Integer error codes carried in `error` messages. The lower-case name goes with them."""

    # 1000-1099: frames and session order
    MALFORMED_FRAME = 1000
    UNKNOWN_TYPE = 1001
    INVALID_MESSAGE = 1002
    FRAME_TOO_LARGE = 1003
    UNSUPPORTED_VERSION = 1004
    UNEXPECTED_MESSAGE = 1005
    UNEXPECTED_BINARY = 1006
    UNKNOWN_REQUEST = 1007
    DUPLICATE_REQUEST = 1008
    TOO_MANY_IN_FLIGHT = 1009
    # 1100-1199: authentication and enrollment
    AUTH_FAILED = 1100
    BAD_SIGNATURE = 1101
    PROOF_EXPIRED = 1102
    PROOF_REPLAYED = 1103
    UNKNOWN_DEVICE = 1104
    DEVICE_REVOKED = 1105
    INVALID_ENROLLMENT_TOKEN = 1106
    AUTH_TIMEOUT = 1107
    # 1200-1299: requests
    RATE_LIMITED = 1200
    OVERLOADED = 1201
    DEADLINE_EXCEEDED = 1202
    CANCELLED = 1203
    BACKEND_ERROR = 1204
    INVALID_REQUEST = 1205
    PRIVACY_VIOLATION = 1206
    # 1300-1399: updates
    UNKNOWN_BUNDLE = 1300
    UNKNOWN_FILE = 1301
    INVALID_RANGE = 1302
    # 1900-1999: server conditions
    INTERNAL_ERROR = 1900
    SHUTTING_DOWN = 1901
    CONNECTION_LOST = 1902

    @property
    def wire_name(self) -> str:
        return self.name.lower()


class CloseCode(IntEnum):
    """WebSocket close codes used by edgeloop (RFC 6455 registry plus 4000-4999)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    PROTOCOL_VIOLATION = 4000
    UNSUPPORTED_VERSION = 4001
    AUTH_TIMEOUT = 4002
    SESSION_REPLACED = 4003


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """What the spec says of one error code."""

    code: ErrorCode
    retryable: bool
    summary: str


_INFO: dict[ErrorCode, tuple[bool, str]] = {
    ErrorCode.MALFORMED_FRAME: (False, "The frame is not UTF-8 JSON holding an object."),
    ErrorCode.UNKNOWN_TYPE: (False, "The `type` is not a message of the negotiated version."),
    ErrorCode.INVALID_MESSAGE: (False, "A field is missing, extra, or of the wrong type."),
    ErrorCode.FRAME_TOO_LARGE: (False, "The frame exceeds `limits.max_message_bytes`."),
    ErrorCode.UNSUPPORTED_VERSION: (
        False,
        "No common protocol version; `data.supported` lists ours.",
    ),
    ErrorCode.UNEXPECTED_MESSAGE: (False, "The message is not allowed in this state or direction."),
    ErrorCode.UNEXPECTED_BINARY: (False, "A binary frame that no `chunk` header announced."),
    ErrorCode.UNKNOWN_REQUEST: (False, "A reply names a request id that is not in flight."),
    ErrorCode.DUPLICATE_REQUEST: (False, "A new request reuses an id still in flight."),
    ErrorCode.TOO_MANY_IN_FLIGHT: (True, "More requests in flight than `limits.max_in_flight`."),
    ErrorCode.AUTH_FAILED: (False, "Authentication failed."),
    ErrorCode.BAD_SIGNATURE: (False, "The proof's signature does not verify with the device key."),
    ErrorCode.PROOF_EXPIRED: (False, "The proof's timestamp is outside the server's window."),
    ErrorCode.PROOF_REPLAYED: (False, "The proof was made for another connection's nonce."),
    ErrorCode.UNKNOWN_DEVICE: (False, "No device is enrolled under this id."),
    ErrorCode.DEVICE_REVOKED: (False, "The device has been revoked by an operator."),
    ErrorCode.INVALID_ENROLLMENT_TOKEN: (
        False,
        "The enrollment token is unknown, used or expired.",
    ),
    ErrorCode.AUTH_TIMEOUT: (False, "The session was not authenticated in time."),
    ErrorCode.RATE_LIMITED: (True, "The device exceeded its request rate; retry later."),
    ErrorCode.OVERLOADED: (True, "The server cannot meet the deadline now; answer locally."),
    ErrorCode.DEADLINE_EXCEEDED: (True, "The request's deadline passed before it was answered."),
    ErrorCode.CANCELLED: (False, "The request was cancelled."),
    ErrorCode.BACKEND_ERROR: (True, "The model backend failed or returned garbage."),
    ErrorCode.INVALID_REQUEST: (False, "The request is well-formed but cannot be served."),
    ErrorCode.PRIVACY_VIOLATION: (False, "The request carried raw personal data; not processed."),
    ErrorCode.UNKNOWN_BUNDLE: (False, "No update bundle has this version."),
    ErrorCode.UNKNOWN_FILE: (False, "The bundle has no file of this name."),
    ErrorCode.INVALID_RANGE: (False, "The offset or length lies outside the file."),
    ErrorCode.INTERNAL_ERROR: (True, "The server failed unexpectedly."),
    ErrorCode.SHUTTING_DOWN: (True, "The server is shutting down; reconnect to another replica."),
    ErrorCode.CONNECTION_LOST: (
        True,
        "The connection closed before the request ended (local only).",
    ),
}


def error_info(code: ErrorCode) -> ErrorInfo:
    retryable, summary = _INFO[code]
    return ErrorInfo(code, retryable, summary)


class ProtocolError(EdgeloopError):
    """Root of the protocol's exceptions; `code` is the wire code that reports it."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class DecodeError(ProtocolError):
    """A frame could not be turned into a message."""

    code = ErrorCode.INVALID_MESSAGE


class FrameTooLarge(DecodeError):
    code = ErrorCode.FRAME_TOO_LARGE


class MalformedFrame(DecodeError):
    code = ErrorCode.MALFORMED_FRAME


class UnknownMessageType(DecodeError):
    code = ErrorCode.UNKNOWN_TYPE


class InvalidMessage(DecodeError):
    code = ErrorCode.INVALID_MESSAGE


class SessionStateError(ProtocolError):
    """Our own side tried something the session does not allow now (a driver bug)."""

    code = ErrorCode.UNEXPECTED_MESSAGE


class RemoteError(ProtocolError):
    """The peer answered with an `error` message; `error` is that message."""

    def __init__(self, error: Error) -> None:
        try:
            code = ErrorCode(error.code)
        except ValueError:
            code = ErrorCode.INTERNAL_ERROR
        super().__init__(f"{error.name} ({error.code}): {error.message}", code=code)
        self.error = error

    @property
    def retryable(self) -> bool:
        return self.error.retryable
