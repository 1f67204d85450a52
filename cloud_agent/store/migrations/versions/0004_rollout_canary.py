"""Rollouts keep their canary cohort (chosen once at publication, not re-ranked per request).

Existing rollouts get the cohort the store computed for them until now: the `canary_share`
of the devices not revoked, ranked by a hash of version and device id.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from cloud_agent.store.rollouts import canary_cohort

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_rollouts = sa.table(
    "rollouts",
    sa.column("version", sa.Integer),
    sa.column("canary_share", sa.Float),
    sa.column("canary", sa.JSON),
)
_devices = sa.table("devices", sa.column("id", sa.String), sa.column("revoked_at", sa.DateTime))


def upgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(sa.Column("canary", sa.JSON, nullable=False, server_default="[]"))
    bind = op.get_bind()
    devices = bind.scalars(sa.select(_devices.c.id).where(_devices.c.revoked_at.is_(None))).all()
    for version, share in bind.execute(sa.select(_rollouts.c.version, _rollouts.c.canary_share)):
        cohort = canary_cohort(version, devices, share)
        bind.execute(_rollouts.update().where(_rollouts.c.version == version).values(canary=cohort))
    with op.batch_alter_table("rollouts") as batch:
        batch.alter_column("canary", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_column("canary")
