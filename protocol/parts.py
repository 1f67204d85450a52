"""The building blocks of protocol v1 messages: constrained scalars, closed sets, and the
nested objects messages carry (`ChatMessage`, `Usage`, `BundleManifest`, ...).

`protocol.messages` puts them together into the messages themselves; both modules' field
docstrings become the descriptions in the published JSON Schema and SPEC.md.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

__all__ = [
    "PLACEHOLDER",
    "BaseModelRef",
    "BundleFile",
    "BundleManifest",
    "ChatMessage",
    "DeviceResources",
    "Direction",
    "KeyEndorsement",
    "Limits",
    "RouteCounts",
    "Usage",
]

# --- constrained scalars ------------------------------------------------------------------

Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]
DeviceIdStr = Identifier
RequestIdStr = Identifier
IdempotencyKeyStr = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
Version = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,3}\.[0-9]{1,3}$")]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Nonce = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{43}$")]
PublicKeyB64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{43}$")]
SignatureB64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{86}$")]
ReasonCode = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.]{0,63}$")]
PLACEHOLDER = re.compile(r"<[A-Z][A-Z_]{0,23}_[0-9]{1,4}>")
"""A placeholder standing for a personal value in a message (`<CARD_1>`, `<PHONE_2>`)."""
PlaceholderName = Annotated[str, StringConstraints(pattern=f"^{PLACEHOLDER.pattern}$")]
FileName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
ShortText = Annotated[str, StringConstraints(max_length=256)]
EnrollmentToken = Annotated[str, StringConstraints(min_length=8, max_length=256)]
Text = Annotated[str, StringConstraints(max_length=65536)]
UnixSeconds = Annotated[int, Field(ge=0, le=2**40)]
Count = Annotated[int, Field(ge=0, le=2**53)]

Capability = Literal["stream", "cancel", "feedback", "report", "updates"]
ServerCapability = Literal["stream", "cancel", "feedback", "report", "updates", "knowledge"]
Priority = Literal["online", "offline"]
FinishReason = Literal["stop", "length", "cancelled"]
Rating = Literal["positive", "negative"]
UpdateState = Literal["applied", "rejected", "rolled_back"]
Thermal = Literal["nominal", "fair", "serious", "critical"]
Direction = Literal["client", "server", "both"]


class _Part(BaseModel):
    """A nested object of a message."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


# --- nested parts -------------------------------------------------------------------------


class BaseModelRef(_Part):
    """The base model a device runs, so updates can be matched to it."""

    id: ShortText
    """Model name, e.g. `SmolLM2-135M-Instruct-Q4_1`."""
    sha256: Sha256Hex
    """SHA-256 of the model file, lower-case hex."""


class DeviceResources(_Part):
    """What the device can spend; the cloud uses it for scheduling and rollout cohorts."""

    cores: int = Field(ge=1, le=1024)
    """CPU cores available to the agent."""
    memory_mb: int = Field(ge=1, le=2**31)
    """Memory available to the agent, in MiB."""
    battery_pct: int | None = Field(default=None, ge=0, le=100)
    """Battery charge in percent; absent on mains-powered devices."""
    charging: bool | None = None
    """Whether the device is charging; absent when unknown."""
    thermal: Thermal | None = None
    """Thermal state as the operating system reports it."""


class Limits(_Part):
    """Limits the server enforces for this session."""

    max_message_bytes: int = Field(ge=1024, le=64 * 2**20)
    """Largest frame, text or binary, either side may send."""
    max_in_flight: int = Field(ge=1, le=1024)
    """Most requests (`escalate` plus `fetch`) a device may have open at once."""
    max_requests_per_minute: int = Field(ge=1, le=10**6)
    """Request rate above which the server answers `rate_limited`."""
    heartbeat_s: int = Field(ge=1, le=3600)
    """Interval of WebSocket pings; a peer silent for two intervals is gone."""


class KeyEndorsement(_Part):
    """A bundle-signing key of the cloud, vouched for by the key it replaced (key rotation)."""

    public_key: PublicKeyB64
    """The new Ed25519 public key, base64url."""
    signature: SignatureB64
    """The replaced key's Ed25519 signature of the ASCII bytes `edgeloop-key/1` and a newline
    followed by `public_key`."""


class ChatMessage(_Part):
    """One turn of a conversation, personal data already replaced by placeholders."""

    role: Literal["system", "user", "assistant"]
    """Who said it."""
    content: Text
    """What was said, with placeholders such as `<CARD_1>` in place of personal values."""


class Usage(_Part):
    """Tokens spent on a request."""

    prompt_tokens: Count
    """Tokens read by the model."""
    completion_tokens: Count
    """Tokens generated by the model."""


class RouteCounts(_Part):
    """How many requests a device answered by each route in a period."""

    local: Count = 0
    """Answered on the device by choice."""
    cloud: Count = 0
    """Escalated and answered by the cloud."""
    local_only: Count = 0
    """Kept on the device because they carried personal data that must not leave it."""
    local_fallback: Count = 0
    """Meant for the cloud, answered on the device because the cloud failed or refused."""


class BundleFile(_Part):
    """One file of an update bundle."""

    name: FileName
    """File name inside the bundle (no directories)."""
    kind: Literal["adapter", "coverage", "other"]
    """What the file is: a GGUF LoRA adapter, router coverage data, or anything else."""
    sha256: Sha256Hex
    """SHA-256 of the whole file, lower-case hex."""
    size: int = Field(ge=0, le=2**40)
    """Exact size in bytes; a download longer than this is refused."""


class BundleManifest(_Part):
    """The signed description of an update bundle."""

    name: ShortText
    """Bundle name, e.g. `northwind-facts`."""
    version: int = Field(ge=1, le=2**53)
    """Version number; a device never accepts one lower than or equal to what it has."""
    base_model_sha256: Sha256Hex
    """SHA-256 of the base model file the adapter was trained for."""
    files: list[BundleFile] = Field(min_length=1, max_length=32)
    """The files of the bundle."""
    created_at: datetime
    """When the bundle was built (RFC 3339)."""
    expires_at: datetime
    """After this instant the manifest must not be applied (freeze attack defence)."""
    metrics: dict[ReasonCode, float] = Field(default_factory=dict, max_length=64)
    """Evaluation figures measured before publication, e.g. `fact_accuracy`."""
