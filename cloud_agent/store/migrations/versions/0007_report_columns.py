"""Device reports keep their period, adapter version and route counts in columns, and their
router reasons in a table of their own (`report_reasons`), so the fleet's routing
(`Store.routing_summary`) is summed by the database, not read report by report.

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
_reasons = sa.table(
    "report_reasons",
    sa.column("device_id", sa.String),
    sa.column("idempotency_key", sa.String),
    sa.column("reason", sa.String),
    sa.column("count", sa.Integer),
    sa.column("period_end", UtcDateTime()),
    sa.column("created_at", UtcDateTime()),
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
    reasons = []
    for device_id, key, body, created_at in rows:
        columns = _columns(body, created_at)
        bind.execute(
            _reports.update()
            .where(_reports.c.device_id == device_id, _reports.c.idempotency_key == key)
            .values(**columns)
        )
        given = body.get("reasons") if isinstance(body, dict) else None
        reasons += [
            {"device_id": device_id, "idempotency_key": key, "reason": str(reason)[:64],
             "count": int(count), "period_end": columns["period_end"], "created_at": created_at}
            for reason, count in (given.items() if isinstance(given, dict) else ())
        ]  # fmt: skip
    # SQLite alters a table by copying it: done with `reports` before anything refers to it.
    with op.batch_alter_table("reports") as batch:
        batch.alter_column("period_start", nullable=False)
        batch.alter_column("period_end", nullable=False)
        for route in ROUTES:
            batch.alter_column(route, server_default=None)
    op.create_index("ix_reports_period_end", "reports", ["period_end"])
    op.create_table(
        "report_reasons",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("idempotency_key", sa.String(128), primary_key=True),
        sa.Column("reason", sa.String(64), primary_key=True),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id", "idempotency_key"], ["reports.device_id", "reports.idempotency_key"]
        ),
    )
    op.create_index("ix_report_reasons_period_end", "report_reasons", ["period_end"])
    if reasons:
        bind.execute(_reasons.insert(), reasons)


def downgrade() -> None:
    op.drop_index("ix_report_reasons_period_end", table_name="report_reasons")
    op.drop_table("report_reasons")
    op.drop_index("ix_reports_period_end", table_name="reports")
    with op.batch_alter_table("reports") as batch:
        for column in ("period_start", "period_end", "adapter_version", *ROUTES):
            batch.drop_column(column)
