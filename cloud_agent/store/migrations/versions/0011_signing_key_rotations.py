"""Rotations of the cluster's bundle-signing key: each key after the first is a row of its own
(ids in order), with the previous key's endorsement of it, which devices check before they move
their pin to it.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("signing_key") as batch:
        batch.add_column(sa.Column("endorsement", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("signing_key") as batch:
        batch.drop_column("endorsement")
