"""Every message of the edgeloop protocol v1, one pydantic class per `type`.

All messages form one discriminated union, `Message`, decoded from a raw text frame by
`decode` (pydantic's `validate_json`, no intermediate `json.loads`) and encoded by `encode`.
Field docstrings become the descriptions in the published JSON Schema and SPEC.md.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from typing import Annotated, Any, ClassVar, Literal, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticSerializationError

from protocol.errors import (
    DecodeError,
    ErrorCode,
    FrameTooLarge,
    InvalidMessage,
    MalformedFrame,
    UnknownMessageType,
    error_info,
)
from protocol.parts import (
    BaseModelRef,
    BundleManifest,
    Capability,
    ChatMessage,
    Count,
    DeviceIdStr,
    DeviceResources,
    Direction,
    EnrollmentToken,
    FileName,
    FinishReason,
    IdempotencyKeyStr,
    Identifier,
    KeyEndorsement,
    Limits,
    Nonce,
    PlaceholderName,
    Priority,
    PublicKeyB64,
    Rating,
    ReasonCode,
    RequestIdStr,
    RouteCounts,
    ServerCapability,
    ShortText,
    SignatureB64,
    Text,
    UnixSeconds,
    UpdateState,
    Usage,
    Version,
)

__all__ = [
    "MESSAGE_ADAPTER",
    "Ack",
    "Auth",
    "Cancel",
    "Challenge",
    "Chunk",
    "Delta",
    "Enroll",
    "Enrolled",
    "Error",
    "Escalate",
    "Feedback",
    "Fetch",
    "Goodbye",
    "Hello",
    "Message",
    "Report",
    "Result",
    "UpdateOffer",
    "UpdateStatus",
    "Welcome",
    "decode",
    "encode",
    "make_error",
]


def _require_type(schema: dict[str, Any]) -> None:
    # `type` has a Python default for convenience, but every frame on the wire carries it.
    required = schema.setdefault("required", [])
    if "type" not in required:
        required.insert(0, "type")


class _Message(BaseModel):
    """Base of every top-level message."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        json_schema_extra=_require_type,
    )
    direction: ClassVar[Direction]
    """Who may send it: the device side (`client`), the cloud (`server`), or either."""
    session_phase: ClassVar[bool] = False
    """True for the messages allowed before the session is authenticated."""


# --- session ------------------------------------------------------------------------------


class Hello(_Message):
    """First frame from the device: who it is and what it speaks."""

    direction = "client"
    session_phase = True
    type: Literal["hello"] = "hello"
    versions: list[Version] = Field(min_length=1, max_length=16)
    """Protocol versions the device supports, e.g. `["1.0"]`."""
    device_id: DeviceIdStr | None = None
    """The device's id; absent when the device enrolls on this connection."""
    sdk: ShortText
    """Client software and version, e.g. `edgeloop-python/0.1.0`."""
    base_model: BaseModelRef | None = None
    """The on-device base model; absent for agents without one."""
    adapter_version: int | None = Field(default=None, ge=0)
    """Version of the active update bundle; absent when none is active."""
    capabilities: list[Capability] = Field(default_factory=list, max_length=16)
    """Optional features the device implements."""
    resources: DeviceResources | None = None
    """Device resources at connection time."""


class Challenge(_Message):
    """The server's answer to `hello`: the negotiated version and a fresh nonce to sign."""

    direction = "server"
    session_phase = True
    type: Literal["challenge"] = "challenge"
    version: Version
    """The protocol version this session will speak."""
    server_id: ShortText
    """Stable id of the server (or cluster); part of the signed proof."""
    nonce: Nonce
    """32 random bytes, base64url without padding, fresh for this connection."""
    server_time: UnixSeconds
    """Server clock, Unix seconds, so a device can see its own skew."""
    proof_window_s: int = Field(ge=1, le=3600)
    """A proof's timestamp must lie within this many seconds of the server clock."""


class Auth(_Message):
    """Proof that the device holds the private key of an enrolled device id."""

    direction = "client"
    session_phase = True
    type: Literal["auth"] = "auth"
    device_id: DeviceIdStr
    """The enrolled device id."""
    nonce: Nonce
    """The nonce of this connection's `challenge`, echoed."""
    timestamp: UnixSeconds
    """Device clock when signing, Unix seconds."""
    signature: SignatureB64
    """Ed25519 signature of the proof payload (see SPEC.md), base64url."""


class Enroll(_Message):
    """Registers a new device with a one-time token and proves possession of its key."""

    direction = "client"
    session_phase = True
    type: Literal["enroll"] = "enroll"
    token: EnrollmentToken
    """One-time enrollment token issued by an operator."""
    public_key: PublicKeyB64
    """The device's Ed25519 public key, raw 32 bytes, base64url."""
    nonce: Nonce
    """The nonce of this connection's `challenge`, echoed."""
    timestamp: UnixSeconds
    """Device clock when signing, Unix seconds."""
    signature: SignatureB64
    """Ed25519 signature of the proof payload by `public_key`'s private half."""
    name: ShortText | None = None
    """Human label for the device, e.g. `kiosk-aisle-3`."""


class Enrolled(_Message):
    """Enrollment succeeded: the device's new id and the key the cloud signs updates with."""

    direction = "server"
    session_phase = True
    type: Literal["enrolled"] = "enrolled"
    device_id: DeviceIdStr
    """The id assigned to the device; use it in every later `hello` and `auth`."""
    server_key: PublicKeyB64
    """Ed25519 public key that signs update bundles; the device pins it."""


class Welcome(_Message):
    """The session is authenticated and open."""

    direction = "server"
    session_phase = True
    type: Literal["welcome"] = "welcome"
    version: Version
    """The negotiated protocol version."""
    session_id: Identifier
    """Id of this session, for logs on both sides."""
    server_id: ShortText
    """Id of the server."""
    device_id: DeviceIdStr
    """The authenticated device."""
    capabilities: list[ServerCapability] = Field(default_factory=list, max_length=16)
    """Optional features the server implements."""
    limits: Limits
    """Limits the server enforces for this session."""
    signing_keys: list[KeyEndorsement] = Field(default_factory=list, max_length=32)
    """The keys the server's bundle-signing key was rotated to, oldest first, each endorsed
    by the one before it (the first by the key devices pinned before any rotation). A device
    moves its pin to the last one, checking every endorsement after the key it pins."""


class Goodbye(_Message):
    """Either side is closing the session on purpose."""

    direction = "both"
    session_phase = True
    type: Literal["goodbye"] = "goodbye"
    reason: Literal["shutdown", "client_closing", "session_replaced", "idle"]
    """Why the session ends."""
    retry_after_s: int | None = Field(default=None, ge=0, le=86400)
    """When set, reconnecting sooner than this is pointless."""


class Error(_Message):
    """A typed error. With `request_id` it ends that request; without, it is about the session."""

    direction = "both"
    session_phase = True
    type: Literal["error"] = "error"
    request_id: RequestIdStr | None = None
    """The request this error ends, if any."""
    code: int = Field(ge=1000, le=1999)
    """Numeric code from the error table."""
    name: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    """The code's name, e.g. `overloaded`."""
    message: ShortText
    """Human-readable detail; never contains personal data."""
    retryable: bool
    """True when the same request may succeed later."""
    data: dict[str, JsonValue] | None = None
    """Structured detail, e.g. `{"supported": ["1.0"]}` for `unsupported_version`."""


# --- escalation ---------------------------------------------------------------------------


class Escalate(_Message):
    """The device asks the cloud to answer a request it decided not to answer itself."""

    direction = "client"
    type: Literal["escalate"] = "escalate"
    request_id: RequestIdStr
    """Id chosen by the device, unique among its requests in flight."""
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    """The conversation, personal data replaced by placeholders."""
    placeholders: list[PlaceholderName] = Field(default_factory=list, max_length=256)
    """Placeholder names used in `messages`; their values never leave the device."""
    intent: ReasonCode | None = None
    """The intent the device guessed, if any."""
    intent_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    """The device's confidence in `intent`."""
    reasons: list[ReasonCode] = Field(default_factory=list, max_length=16)
    """Why the device escalated, as router reason codes (e.g. `difficulty.comparison`)."""
    priority: Priority = "online"
    """`online` for a user waiting now, `offline` for work that may wait for idle capacity."""
    deadline_ms: int = Field(ge=1, le=3_600_000)
    """Milliseconds from sending after which the device stops waiting."""
    max_tokens: int = Field(ge=1, le=32768)
    """Most tokens to generate. A server may cap it lower; an answer cut at the cap ends with
    `finish_reason` `length`."""
    stream: bool = False
    """Whether to send `delta` frames before the `result`."""


class Delta(_Message):
    """A piece of a streamed answer."""

    direction = "server"
    type: Literal["delta"] = "delta"
    request_id: RequestIdStr
    """The request this piece belongs to."""
    seq: Count
    """0 for the first delta of a request, then 1, 2, ... without gaps."""
    text: Text
    """The text to append."""


class Result(_Message):
    """The one final answer of a request (after any deltas)."""

    direction = "server"
    type: Literal["result"] = "result"
    request_id: RequestIdStr
    """The request answered."""
    text: Text
    """The whole answer (also when it was streamed), placeholders kept as sent."""
    finish_reason: FinishReason
    """Why generation stopped."""
    usage: Usage
    """Tokens spent."""
    model: ShortText
    """Model that produced the answer."""
    sources: list[Identifier] = Field(default_factory=list, max_length=32)
    """Ids of knowledge facts the answer is grounded on."""


class Cancel(_Message):
    """Stop a request. From the device, the server still ends it with exactly one `result`
    or `error`; from the server, the cancel itself ends it. A cancel of a request that is no
    longer in flight is ignored."""

    direction = "both"
    type: Literal["cancel"] = "cancel"
    request_id: RequestIdStr
    """The request to stop."""
    reason: ShortText | None = None
    """Why, for logs."""


# --- feedback and telemetry ---------------------------------------------------------------


class Feedback(_Message):
    """The user's verdict on an answer; stored once per idempotency key."""

    direction = "client"
    type: Literal["feedback"] = "feedback"
    idempotency_key: IdempotencyKeyStr
    """Same key on every resend of this feedback."""
    request_id: RequestIdStr
    """The request the feedback is about."""
    rating: Rating
    """Thumbs up or down."""
    correction: Text | None = None
    """A better answer, personal data replaced by placeholders."""
    adapter_version: int | None = Field(default=None, ge=1, le=2**53)
    """Set when the device answered the request itself with this adapter version active, so
    the cloud can watch the answers of a rollout (and halt it)."""


class Report(_Message):
    """Periodic routing and resource report; stored once per idempotency key."""

    direction = "client"
    type: Literal["report"] = "report"
    idempotency_key: IdempotencyKeyStr
    """Same key on every resend of this report."""
    period_start: datetime
    """Start of the period covered (RFC 3339)."""
    period_end: datetime
    """End of the period covered (RFC 3339)."""
    routes: RouteCounts
    """Requests per route in the period."""
    reasons: dict[ReasonCode, Count] = Field(default_factory=dict, max_length=128)
    """Router decisions per reason code in the period."""
    adapter_version: int | None = Field(default=None, ge=0)
    """Bundle version that answered in the period (null: the base model); a period ends when
    the device's adapter changes."""
    resources: DeviceResources | None = None
    """Device resources at the end of the period."""


class Ack(_Message):
    """Receipt for `feedback`, `report` or `update_status`, sent after it is durably stored."""

    direction = "server"
    type: Literal["ack"] = "ack"
    idempotency_key: IdempotencyKeyStr
    """The key of the acknowledged message."""
    duplicate: bool = False
    """True when the key had been stored before (a resend after a lost ack)."""


# --- updates ------------------------------------------------------------------------------


class UpdateOffer(_Message):
    """The cloud offers a signed update bundle."""

    direction = "server"
    type: Literal["update_offer"] = "update_offer"
    manifest: Annotated[str, StringConstraints(max_length=65536)]
    """The manifest as JSON text, exactly the bytes that were signed (UTF-8)."""
    signature: SignatureB64
    """Ed25519 signature of the UTF-8 bytes of `manifest` by the pinned server key."""

    @field_validator("manifest")
    @classmethod
    def _manifest_is_valid(cls, value: str) -> str:
        BundleManifest.model_validate_json(value)
        return value

    @cached_property
    def bundle(self) -> BundleManifest:
        """The parsed manifest. Verify `signature` before trusting it."""
        return BundleManifest.model_validate_json(self.manifest)


class Fetch(_Message):
    """Ask for a byte range of a bundle file; answered by one `chunk` or an `error`."""

    direction = "client"
    type: Literal["fetch"] = "fetch"
    request_id: RequestIdStr
    """Id of this fetch, unique among the device's requests in flight."""
    version: int = Field(ge=1, le=2**53)
    """Bundle version."""
    file: FileName
    """File name from the manifest."""
    offset: int = Field(ge=0, le=2**40)
    """First byte wanted; resume an interrupted download from what is on disk."""
    length: int = Field(ge=1, le=64 * 2**20)
    """Most bytes wanted; the server may send fewer to stay within its frame limit."""


class Chunk(_Message):
    """Header of a file range; the very next frame is binary and holds exactly `length` bytes."""

    direction = "server"
    type: Literal["chunk"] = "chunk"
    request_id: RequestIdStr
    """The fetch answered."""
    file: FileName
    """File name."""
    offset: int = Field(ge=0, le=2**40)
    """Position of the first byte in the file."""
    length: int = Field(ge=0, le=64 * 2**20)
    """Bytes in the binary frame that follows."""
    size: int = Field(ge=0, le=2**40)
    """Size of the whole file."""


class UpdateStatus(_Message):
    """The device reports what it did with a bundle; stored once per idempotency key."""

    direction = "client"
    type: Literal["update_status"] = "update_status"
    idempotency_key: IdempotencyKeyStr
    """Same key on every resend of this status."""
    version: int = Field(ge=1, le=2**53)
    """Bundle version."""
    status: UpdateState
    """`applied`, `rejected` (never activated) or `rolled_back` (activated, then undone)."""
    reason: ShortText | None = None
    """Why it was rejected or rolled back."""
    self_check: dict[ReasonCode, float] = Field(default_factory=dict, max_length=64)
    """Figures from the device's self-check after the swap."""


Message: TypeAlias = Annotated[
    Hello
    | Challenge
    | Auth
    | Enroll
    | Enrolled
    | Welcome
    | Goodbye
    | Error
    | Escalate
    | Delta
    | Result
    | Cancel
    | Feedback
    | Report
    | Ack
    | UpdateOffer
    | Fetch
    | Chunk
    | UpdateStatus,
    Field(discriminator="type"),
]

MESSAGE_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)
MESSAGE_TYPES: dict[str, type[_Message]] = {
    cls.model_fields["type"].default: cls
    for cls in (
        Hello, Challenge, Auth, Enroll, Enrolled, Welcome, Goodbye, Error, Escalate, Delta,
        Result, Cancel, Feedback, Report, Ack, UpdateOffer, Fetch, Chunk, UpdateStatus,
    )
}  # fmt: skip


def decode(frame: str | bytes, *, max_bytes: int | None = None) -> Message:
    """Decode one text frame into a message, or raise a `DecodeError` saying what is wrong."""
    # A str of n characters is at most 4n UTF-8 bytes: encode only when it could matter.
    if max_bytes is not None and len(frame) * (1 if isinstance(frame, bytes) else 4) > max_bytes:
        size = len(frame) if isinstance(frame, bytes) else len(frame.encode("utf-8", "replace"))
        if size > max_bytes:
            raise FrameTooLarge(f"frame of {size} bytes exceeds the limit of {max_bytes}")
    try:
        return MESSAGE_ADAPTER.validate_json(frame)
    except ValidationError as exc:
        raise _classify(exc, frame) from None


def _classify(exc: ValidationError, frame: str | bytes) -> DecodeError:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    kind = first["type"]
    if kind == "json_invalid":
        return MalformedFrame(f"not valid JSON: {first['msg']}")
    if kind in ("dict_type", "model_attributes_type") and not first["loc"]:
        return MalformedFrame("a frame must be a JSON object")
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        if kind == "union_tag_invalid":
            try:
                tag = json.loads(frame).get("type")
            except (ValueError, AttributeError):
                tag = None
            # A `type` that is not a string is a schema error; an unknown string is a type error.
            if isinstance(tag, str):
                return UnknownMessageType(f"unknown message type {tag[:64]!r}")
        return InvalidMessage("missing or invalid `type` field")
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err["loc"][1:]) or "<message>"
        parts.append(f"{loc}: {err['msg']}")
    return InvalidMessage("; ".join(parts))


def encode(message: Message) -> str:
    """Encode a message as the text of one frame (compact JSON, `None` fields omitted)."""
    try:
        return message.model_dump_json(exclude_none=True)
    except PydanticSerializationError as exc:  # pragma: no cover - models are closed
        raise InvalidMessage(f"cannot encode {message.type}: {exc}") from exc


def make_error(
    code: ErrorCode,
    message: str,
    *,
    request_id: str | None = None,
    data: dict[str, JsonValue] | None = None,
    retryable: bool | None = None,
) -> Error:
    """Build an `error` message with the code's name and default `retryable` flag."""
    info = error_info(code)
    return Error(
        request_id=request_id,
        code=int(code),
        name=code.wire_name,
        message=message[:256],
        retryable=info.retryable if retryable is None else retryable,
        data=data,
    )
