"""Alembic environment: runs on the connection batchd hands it (see store/connect.py)."""

from __future__ import annotations

from alembic import context

from batchd.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `batchd migrate`")
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
context.run_migrations()
