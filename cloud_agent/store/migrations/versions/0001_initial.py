"""Initial schema: devices, enrollment tokens, sessions, interactions, feedback, reports,
adapters, deployments, status reports, privacy events.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("public_key", sa.String(64), nullable=False, unique=True),
        sa.Column("name", sa.String(256)),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_seen_at", TS),
        sa.Column("revoked_at", TS),
        sa.Column("base_model_sha256", sa.String(64)),
        sa.Column("adapter_version", sa.Integer),
        sa.Column("privacy_violations", sa.Integer, nullable=False),
    )
    op.create_table(
        "enrollment_tokens",
        sa.Column("token_sha256", sa.String(64), primary_key=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("used_at", TS),
        sa.Column("device_id", sa.String(64)),
        sa.Column("note", sa.String(256)),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("server_id", sa.String(256), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS),
        sa.Column("close_code", sa.Integer),
    )
    op.create_index("ix_sessions_device_id", "sessions", ["device_id"])
    op.create_table(
        "interactions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("session_id", sa.String(64)),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("prompt", sa.JSON, nullable=False),
        sa.Column("answer", sa.Text),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error_name", sa.String(64)),
        sa.Column("intent", sa.String(64)),
        sa.Column("route_reasons", sa.JSON, nullable=False),
        sa.Column("priority", sa.String(16), nullable=False),
        sa.Column("latency_ms", sa.Integer),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("backend", sa.String(128)),
        sa.Column("model", sa.String(256)),
        sa.Column("fact_ids", sa.JSON, nullable=False),
        sa.UniqueConstraint("device_id", "request_id"),
    )
    op.create_index("ix_interactions_device_id", "interactions", ["device_id"])
    op.create_index("ix_interactions_created_at", "interactions", ["created_at"])
    op.create_table(
        "feedback",
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("idempotency_key", sa.String(128), primary_key=True),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("rating", sa.String(16), nullable=False),
        sa.Column("correction", sa.Text),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_feedback_request_id", "feedback", ["request_id"])
    op.create_index("ix_feedback_created", "feedback", ["created_at"])
    op.create_table(
        "reports",
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("idempotency_key", sa.String(128), primary_key=True),
        sa.Column("body", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "adapters",
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("base_model_sha256", sa.String(64), nullable=False),
        sa.Column("manifest", sa.Text, nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("directory", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
    )
    op.create_table(
        "deployments",
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("version", sa.Integer, sa.ForeignKey("adapters.version"), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(256)),
        sa.Column("self_check", sa.JSON, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "status_reports",
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("idempotency_key", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "privacy_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("kinds", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_privacy_events_device_id", "privacy_events", ["device_id"])


def downgrade() -> None:
    for table in (
        "privacy_events", "status_reports", "deployments", "adapters", "reports", "feedback",
        "interactions", "sessions", "enrollment_tokens", "devices",
    ):  # fmt: skip
        op.drop_table(table)
