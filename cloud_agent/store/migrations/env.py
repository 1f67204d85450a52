"""Alembic environment: migrations run on the connection `Store.open` hands over."""

from __future__ import annotations

from alembic import context

from cloud_agent.store.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through cloud_agent.store.Store.open()")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
