"""Plain values going into and out of the store (no ORM objects leak out of it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

from protocol import ChatMessage


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    id: str
    public_key: str
    name: str | None
    created_at: datetime
    last_seen_at: datetime | None
    revoked_at: datetime | None
    adapter_version: int | None
    privacy_violations: int

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def as_dict(self) -> dict[str, Any]:
        """Every field and `revoked`, as JSON takes them (times in ISO 8601)."""
        out = asdict(self)
        for key in ("created_at", "last_seen_at", "revoked_at"):
            out[key] = out[key].isoformat() if out[key] else None
        return out | {"revoked": self.revoked}


INTERACTION_STATUSES = ("ok", "error", "cancelled")
"""How an escalation can end, as stored."""
MAX_INTERACTIONS_PAGE = 1000
"""The most interactions one listing returns (the admin API and the CLI)."""


@dataclass(slots=True)  # not frozen: one is made per escalation, and frozen fields cost 3x
class NewInteraction:
    """An escalation and how it ended, redacted as the device sent it. The sequences may be
    the escalation's own (held, not copied): nothing changes them."""

    device_id: str
    request_id: str
    messages: Sequence[ChatMessage | Mapping[str, str]]
    """The conversation: the `ChatMessage`s of the escalation, or their JSON form."""
    placeholders: Sequence[str]
    status: str
    """One of `INTERACTION_STATUSES`."""
    priority: str = "online"
    session_id: str | None = None
    answer: str | None = None
    error_name: str | None = None
    intent: str | None = None
    route_reasons: Sequence[str] = ()
    latency_ms: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    backend: str | None = None
    model: str | None = None
    fact_ids: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class NewFeedback:
    """A rating (and perhaps a correction) a device sent on one of its requests; stored once
    per device and idempotency key."""

    device_id: str
    idempotency_key: str
    request_id: str
    rating: str
    correction: str | None = None
    adapter_version: int | None = None
    """Set when the device answered with that adapter active (rollouts watch these)."""


@dataclass(frozen=True, slots=True, eq=False)
class NewReport:
    """A device's routing report, stored once per device and idempotency key: the whole
    message in `body`, and what the fleet's routing is summed over. Compared by identity:
    the body is a dict."""

    device_id: str
    idempotency_key: str
    body: dict[str, Any]
    period_start: datetime
    period_end: datetime
    routes: RouteCounts
    adapter_version: int | None = None


@dataclass(frozen=True, slots=True)
class RouteCounts:
    """Requests by where they were answered (the protocol's routes)."""

    local: int = 0
    """On the device, by choice."""
    cloud: int = 0
    local_only: int = 0
    """On the device, because they carried personal data that must not leave it."""
    local_fallback: int = 0
    """Meant for the cloud, answered on the device because the cloud failed or refused."""

    @property
    def total(self) -> int:
        return self.local + self.cloud + self.local_only + self.local_fallback

    @property
    def on_device_share(self) -> float | None:
        """The share answered on the device, for whatever reason (None: no requests)."""
        return 1 - self.cloud / self.total if self.total else None

    def __add__(self, other: RouteCounts) -> RouteCounts:
        return RouteCounts(
            self.local + other.local,
            self.cloud + other.cloud,
            self.local_only + other.local_only,
            self.local_fallback + other.local_fallback,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "local": self.local, "cloud": self.cloud, "local_only": self.local_only,
            "local_fallback": self.local_fallback, "total": self.total,
            "on_device_share": self.on_device_share,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class RoutingSummary:
    """Where the fleet's requests were answered, from the reports of periods ending at or
    after `since`."""

    since: datetime
    reports: int
    devices: int
    by_adapter_version: dict[int | None, RouteCounts]
    """None: answered without an adapter (the base model)."""
    reasons: dict[str, int]
    """The router's reasons over the same reports, most frequent first."""
    cloud_tokens: int = 0
    """Tokens the cloud's model read and wrote for the escalations logged since `since` (of
    the same devices): what the requests that reached the cloud cost."""

    @property
    def routes(self) -> RouteCounts:
        """In all, whatever the adapter."""
        return sum(self.by_adapter_version.values(), RouteCounts())

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "reports": self.reports,
            "devices": self.devices,
            "routes": self.routes.as_dict(),
            "cloud_tokens": self.cloud_tokens,
            "by_adapter_version": [
                {"adapter_version": version, **counts.as_dict()}
                for version, counts in self.by_adapter_version.items()
            ],
            "reasons": self.reasons,
        }


@dataclass(frozen=True, slots=True, eq=False)
class NewUpdateStatus:
    """How applying a bundle went on a device (applied, rejected, rolled back), stored once
    per device and idempotency key. Compared by identity: the self-check is a dict."""

    device_id: str
    idempotency_key: str
    version: int
    status: str
    reason: str | None
    self_check: dict[str, float]


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """A session began (with what the device announced) or ended; written in batches."""

    kind: Literal["started", "ended"]
    session_id: str
    device_id: str
    at: datetime
    server_id: str | None = None
    adapter_version: int | None = None
    base_model_sha256: str | None = None
    close_code: int | None = None


@dataclass(frozen=True, slots=True)
class InteractionRecord:
    id: int
    device_id: str
    request_id: str
    created_at: datetime
    messages: list[dict[str, str]]
    placeholders: list[str]
    answer: str | None
    status: str
    error_name: str | None
    intent: str | None
    route_reasons: list[str]
    latency_ms: int | None
    prompt_tokens: int
    completion_tokens: int
    backend: str | None
    model: str | None
    fact_ids: list[str]
    rating: str | None = None
    correction: str | None = None

    @property
    def question(self) -> str:
        """The last user message of the conversation ("" if there is none)."""
        return next(
            (m["content"] for m in reversed(self.messages) if m.get("role") == "user"), ""
        ).strip()

    @property
    def follows_up(self) -> bool:
        """Whether the question was asked after earlier turns (an answer among them): its
        words may ask for something only together with those turns ("And on Sundays?")."""
        return any(m.get("role") == "assistant" for m in self.messages)

    def as_dict(self) -> dict[str, Any]:
        """Every field, as JSON takes it (`created_at` in ISO 8601)."""
        return asdict(self) | {"created_at": self.created_at.isoformat()}


@dataclass(frozen=True, slots=True)
class FeedbackSummary:
    positive: int
    negative: int
    corrections: int
