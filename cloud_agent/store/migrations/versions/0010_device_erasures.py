"""When a device was erased (`forget_device`), so replicas and a cloud running beside the CLI
find the erasures they did not hear of, as they find revocations; both columns indexed, since
every replica asks for the recent ones every few seconds.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("forgotten_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_devices_revoked_at", "devices", ["revoked_at"])
    op.create_index("ix_devices_forgotten_at", "devices", ["forgotten_at"])


def downgrade() -> None:
    op.drop_index("ix_devices_forgotten_at", "devices")
    op.drop_index("ix_devices_revoked_at", "devices")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("forgotten_at")
