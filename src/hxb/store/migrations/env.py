"""Alembic environment: runs on the connection that `hxb.store.sql` hands over."""

from alembic import context

from hxb.store.schema import metadata

connection = context.config.attributes["connection"]
# Batch mode lets later migrations alter tables on SQLite too.
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
