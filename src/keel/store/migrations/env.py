"""Alembic environment: Keel always passes an open connection."""

from alembic import context

from keel.store.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - Keel never runs alembic without one
    raise RuntimeError("run migrations through keel.store.engine.migrate()")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
