"""Table definitions. Schema changes go through an Alembic migration in `migrations/versions`;
a test compares these definitions with the migrated database."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UtcDateTime(TypeDecorator[datetime]):
    """A point in time, stored in UTC and read back timezone-aware on every backend (SQLite
    keeps no offset, so without this its values would come back naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        # A naive value is taken as UTC (what SQLite gives back), never as local time.
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {
        datetime: UtcDateTime(),
        dict[str, Any]: JSON,
        list[str]: JSON,
    }


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime]
    last_seen_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    forgotten_at: Mapped[datetime | None]
    """When its data was erased (`Store.forget_device`); the row stays as a tombstone."""
    base_model_sha256: Mapped[str | None] = mapped_column(String(64))
    adapter_version: Mapped[int | None] = mapped_column(Integer)
    privacy_violations: Mapped[int] = mapped_column(Integer, default=0)


class SigningKey(Base):
    """The public halves of the keys the cluster signs update bundles with: id 1 written by
    the first replica to start, each later id a rotation (`edgeloop cloud rotate-key`); the
    highest id is the key in use."""

    __tablename__ = "signing_key"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    public_key: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    endorsement: Mapped[str | None] = mapped_column(String(128))
    """The previous key's signature of this one (`protocol.endorse_key`); none for id 1."""


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    device_id: Mapped[str | None] = mapped_column(String(64))
    note: Mapped[str | None] = mapped_column(String(256))


class Session(Base):
    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    server_id: Mapped[str] = mapped_column(String(256))
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    close_code: Mapped[int | None] = mapped_column(Integer)


class Interaction(Base):
    __tablename__ = "interactions"
    __table_args__ = (UniqueConstraint("device_id", "request_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    """Looked up through the unique (device_id, request_id) index, which it leads."""
    request_id: Mapped[str] = mapped_column(String(64))
    session_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(index=True)
    prompt: Mapped[dict[str, Any]]
    """The redacted conversation and placeholder names, as the device sent them."""
    answer: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    error_name: Mapped[str | None] = mapped_column(String(64))
    intent: Mapped[str | None] = mapped_column(String(64))
    route_reasons: Mapped[list[str]]
    priority: Mapped[str] = mapped_column(String(16))
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    backend: Mapped[str | None] = mapped_column(String(128))
    model: Mapped[str | None] = mapped_column(String(256))
    fact_ids: Mapped[list[str]]


INTERACTIONS: Table = Interaction.__table__  # type: ignore[assignment]
"""The interactions table itself, for Core inserts on the hot path."""


class Feedback(Base):
    __tablename__ = "feedback"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    rating: Mapped[str] = mapped_column(String(16))
    correction: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    adapter_version: Mapped[int | None] = mapped_column(Integer)
    """Set when the device answered with that adapter active (rollouts watch these)."""


class Report(Base):
    """A device's routing report: the whole message in `body`, what the fleet view sums over
    in columns of its own."""

    __tablename__ = "reports"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(128), primary_key=True)
    body: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    period_start: Mapped[datetime]
    period_end: Mapped[datetime]
    adapter_version: Mapped[int | None] = mapped_column(Integer)
    """The adapter the device answered with in the period (None: the base model)."""
    local: Mapped[int] = mapped_column(Integer)
    cloud: Mapped[int] = mapped_column(Integer)
    local_only: Mapped[int] = mapped_column(Integer)
    local_fallback: Mapped[int] = mapped_column(Integer)


class ReportReason(Base):
    """One router reason of a report and how often it was given in the report's period; the
    period's end is repeated here so the fleet view sums reasons without reading reports."""

    __tablename__ = "report_reasons"
    __table_args__ = (
        ForeignKeyConstraint(
            ["device_id", "idempotency_key"], ["reports.device_id", "reports.idempotency_key"]
        ),
    )

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(128), primary_key=True)
    reason: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
    period_end: Mapped[datetime]
    created_at: Mapped[datetime]


class Adapter(Base):
    __tablename__ = "adapters"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(256))
    base_model_sha256: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[str] = mapped_column(Text)
    signature: Mapped[str] = mapped_column(String(128))
    directory: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]
    metrics: Mapped[dict[str, Any]]


class BundleBlock(Base):
    """A published bundle's files, block by block: every replica can serve a bundle, whichever
    host built it (each copies the blocks to its own disk on first use)."""

    __tablename__ = "bundle_blocks"

    version: Mapped[int] = mapped_column(ForeignKey("adapters.version"), primary_key=True)
    file: Mapped[str] = mapped_column(String(128), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Rollout(Base):
    """One published bundle's rollout: canary, active, halted or rolled_back."""

    __tablename__ = "rollouts"

    version: Mapped[int] = mapped_column(
        ForeignKey("adapters.version"), primary_key=True, autoincrement=False
    )
    state: Mapped[str] = mapped_column(String(16))
    canary_share: Mapped[float] = mapped_column(Float)
    canary: Mapped[list[str]]
    """Device ids offered the bundle first, chosen when it was published."""
    reason: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Deployment(Base):
    __tablename__ = "deployments"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    version: Mapped[int] = mapped_column(ForeignKey("adapters.version"), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(256))
    self_check: Mapped[dict[str, Any]]
    updated_at: Mapped[datetime]


class StatusReport(Base):
    """update_status messages, stored once per idempotency key."""

    __tablename__ = "status_reports"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]


class PrivacyEvent(Base):
    """Raw personal data seen by the cloud. Only the kinds are kept, never the values."""

    __tablename__ = "privacy_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    request_id: Mapped[str] = mapped_column(String(64))
    kinds: Mapped[list[str]]
    created_at: Mapped[datetime]


class Job(Base):
    """Offline work submitted through the admin API or the CLI."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    total: Mapped[int] = mapped_column(Integer)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    params: Mapped[dict[str, Any]]


class JobItem(Base):
    __tablename__ = "job_items"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    status: Mapped[str] = mapped_column(String(16), index=True)
    input: Mapped[dict[str, Any]]
    output: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(String(256))
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_at: Mapped[datetime | None]


Index("ix_devices_revoked_at", Device.revoked_at)
Index("ix_devices_forgotten_at", Device.forgotten_at)
Index("ix_feedback_created", Feedback.created_at)
# Reviewing a rollout counts its deployments and the feedback given under it.
Index("ix_deployments_version", Deployment.version, Deployment.status)
Index("ix_feedback_adapter_version", Feedback.adapter_version, Feedback.rating)
Index("ix_reports_period_end", Report.period_end)
Index("ix_report_reasons_period_end", ReportReason.period_end)
