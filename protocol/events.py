"""What a session hands its driver: frames to send and events received.

Frames are what the driver writes to the socket, in order. Events are what happened, for the
application. Both are plain immutable values.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.errors import CloseCode, ErrorCode
from protocol.messages import (
    Ack,
    Cancel,
    Chunk,
    Delta,
    Enroll,
    Error,
    Escalate,
    Feedback,
    Fetch,
    Goodbye,
    Hello,
    Report,
    Result,
    UpdateOffer,
    UpdateStatus,
    Welcome,
)

__all__ = [
    "AckReceived",
    "AuthRequested",
    "BinaryFrame",
    "CancelRequested",
    "ChunkReceived",
    "CloseFrame",
    "DeltaReceived",
    "EnrollmentCompleted",
    "EnrollmentRequested",
    "EscalationReceived",
    "Event",
    "FeedbackReceived",
    "FetchReceived",
    "Frame",
    "GoodbyeReceived",
    "HelloReceived",
    "PeerError",
    "ProtocolViolation",
    "ReportReceived",
    "RequestCancelled",
    "RequestFailed",
    "ResultReceived",
    "SessionClosed",
    "TextFrame",
    "UpdateOffered",
    "UpdateStatusReceived",
    "Welcomed",
]


# --- frames to send -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextFrame:
    data: str


@dataclass(frozen=True, slots=True)
class BinaryFrame:
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseFrame:
    """Close the WebSocket with this code; nothing is sent after it."""

    code: CloseCode
    reason: str


Frame = TextFrame | BinaryFrame | CloseFrame


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The peer sent something invalid; an `error` (and maybe a close) has been queued."""

    code: ErrorCode
    detail: str


@dataclass(frozen=True, slots=True)
class PeerError:
    """The peer sent an `error` about the session (no request id)."""

    error: Error


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """The session is over; `code` is the close code queued or received."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class GoodbyeReceived:
    message: Goodbye


# server side


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """A device said hello and has been challenged."""

    hello: Hello


@dataclass(frozen=True, slots=True)
class AuthRequested:
    """A device asks to authenticate as `device_id`. Look up its key, then call `accept`
    (the session verifies the signature) or `refuse`."""

    device_id: str


@dataclass(frozen=True, slots=True)
class EnrollmentRequested:
    """A device proved possession of `request.public_key` and offers a token. Check the
    token, then call `complete_enrollment` or `refuse`."""

    request: Enroll


@dataclass(frozen=True, slots=True)
class EscalationReceived:
    request: Escalate


@dataclass(frozen=True, slots=True)
class CancelRequested:
    """The device asks to stop a request in flight; end it with one `result` or `error`."""

    request_id: str


@dataclass(frozen=True, slots=True)
class FetchReceived:
    request: Fetch


@dataclass(frozen=True, slots=True)
class FeedbackReceived:
    message: Feedback


@dataclass(frozen=True, slots=True)
class ReportReceived:
    message: Report


@dataclass(frozen=True, slots=True)
class UpdateStatusReceived:
    message: UpdateStatus


# client side


@dataclass(frozen=True, slots=True)
class EnrollmentCompleted:
    """Enrollment succeeded: persist `device_id` and pin `server_key`."""

    device_id: str
    server_key: str


@dataclass(frozen=True, slots=True)
class Welcomed:
    welcome: Welcome


@dataclass(frozen=True, slots=True)
class DeltaReceived:
    delta: Delta


@dataclass(frozen=True, slots=True)
class ResultReceived:
    """The final answer. `cancelled_locally` is True when we had cancelled the request."""

    result: Result
    cancelled_locally: bool = False


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """A request ended with an error (from the peer, or because the session closed)."""

    request_id: str
    error: Error
    cancelled_locally: bool = False


@dataclass(frozen=True, slots=True)
class RequestCancelled:
    """The server cancelled a request; no more frames will come for it."""

    message: Cancel


@dataclass(frozen=True, slots=True)
class ChunkReceived:
    header: Chunk
    data: bytes


@dataclass(frozen=True, slots=True)
class AckReceived:
    ack: Ack


@dataclass(frozen=True, slots=True)
class UpdateOffered:
    offer: UpdateOffer


Event = (
    ProtocolViolation
    | PeerError
    | SessionClosed
    | GoodbyeReceived
    | HelloReceived
    | AuthRequested
    | EnrollmentRequested
    | EscalationReceived
    | CancelRequested
    | FetchReceived
    | FeedbackReceived
    | ReportReceived
    | UpdateStatusReceived
    | EnrollmentCompleted
    | Welcomed
    | DeltaReceived
    | ResultReceived
    | RequestFailed
    | RequestCancelled
    | ChunkReceived
    | AckReceived
    | UpdateOffered
)
