"""Published bundles' files in the store, in blocks, so that a replica on another host can
serve a bundle it did not build. Bundles published before keep being served from their
directory only.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bundle_blocks",
        sa.Column("version", sa.Integer, sa.ForeignKey("adapters.version"), primary_key=True),
        sa.Column("file", sa.String(128), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("bundle_blocks")
