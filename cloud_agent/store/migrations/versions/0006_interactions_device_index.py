"""Drop the index on interactions.device_id: the unique (device_id, request_id) index leads with
the same column and serves every lookup by device, so the second index only cost a b-tree
insert per logged request.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_interactions_device_id", table_name="interactions")


def downgrade() -> None:
    op.create_index("ix_interactions_device_id", "interactions", ["device_id"])
