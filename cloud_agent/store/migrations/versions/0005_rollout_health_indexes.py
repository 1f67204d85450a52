"""Indexes for reviewing a rollout: its deployments by version, its feedback by adapter version.

A rollout is reviewed whenever a device reports on it. Without these, each review read the
whole deployments table (keyed by device first) and the whole feedback table: 23 ms a review
with 100,000 feedback rows, paid once per device report.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_deployments_version", "deployments", ["version", "status"])
    op.create_index("ix_feedback_adapter_version", "feedback", ["adapter_version", "rating"])


def downgrade() -> None:
    op.drop_index("ix_feedback_adapter_version", table_name="feedback")
    op.drop_index("ix_deployments_version", table_name="deployments")
