"""Device reports keep their period, adapter version and route counts in columns, so the
fleet's routing (`Store.routing_summary`) is summed by the database, not read report by report.

Existing reports are filled in from their stored message.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

from cloud_agent.store.tables import UtcDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

ROUTES = ("local", "cloud", "local_only", "local_fallback")

_reports = sa.table(
    "reports",
    sa.column("device_id", sa.String),
    sa.column("idempotency_key", sa.String),
    sa.column("body", sa.JSON),
    sa.column("created_at", UtcDateTime()),
    sa.column("period_start", UtcDateTime()),
    sa.column("period_end", UtcDateTime()),
    sa.column("adapter_version", sa.Integer),
    *(sa.column(route, sa.Integer) for route in ROUTES),
)


def _when(value: Any, default: datetime) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return default


def _columns(body: Any, created_at: datetime) -> dict[str, Any]:
    body = body if isinstance(body, dict) else {}
    routes = body.get("routes") if isinstance(body.get("routes"), dict) else {}
    version = body.get("adapter_version")
    return {
        "period_start": _when(body.get("period_start"), created_at),
        "period_end": _when(body.get("period_end"), created_at),
        "adapter_version": version if isinstance(version, int) else None,
        **{route: int(routes.get(route) or 0) for route in ROUTES},
    }


def upgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.add_column(sa.Column("period_start", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("period_end", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("adapter_version", sa.Integer, nullable=True))
        for route in ROUTES:
            batch.add_column(sa.Column(route, sa.Integer, nullable=False, server_default="0"))
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(_reports.c.device_id, _reports.c.idempotency_key, _reports.c.body,
                  _reports.c.created_at)
    ).all()  # fmt: skip
    for device_id, key, body, created_at in rows:
        bind.execute(
            _reports.update()
            .where(_reports.c.device_id == device_id, _reports.c.idempotency_key == key)
            .values(**_columns(body, created_at))
        )
    with op.batch_alter_table("reports") as batch:
        batch.alter_column("period_start", nullable=False)
        batch.alter_column("period_end", nullable=False)
        for route in ROUTES:
            batch.alter_column(route, server_default=None)
    op.create_index("ix_reports_period_end", "reports", ["period_end"])


def downgrade() -> None:
    op.drop_index("ix_reports_period_end", table_name="reports")
    with op.batch_alter_table("reports") as batch:
        for column in ("period_start", "period_end", "adapter_version", *ROUTES):
            batch.drop_column(column)
