"""Rollouts of adapter bundles, and which adapter answered a rated request.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column(
            "version", sa.Integer, sa.ForeignKey("adapters.version"), primary_key=True,
            autoincrement=False,
        ),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("canary_share", sa.Float, nullable=False),
        sa.Column("reason", sa.String(256)),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )  # fmt: skip
    with op.batch_alter_table("feedback") as batch:
        batch.add_column(sa.Column("adapter_version", sa.Integer))


def downgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("adapter_version")
    op.drop_table("rollouts")
