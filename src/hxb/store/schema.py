"""The store's tables (SQLAlchemy Core), shared by SQLite and PostgreSQL. Changes go through
an Alembic migration in `migrations/versions/`."""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Column, Index, Integer, LargeBinary, MetaData, String, Table, Text

metadata = MetaData()

functions = Table(
    "functions",
    metadata,
    Column("workspace", String(64), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("revision_id", String(64), nullable=False),
    Column("config", JSON, nullable=False),
    Column("code_sha256", String(64), nullable=False),
    Column("code_size_bytes", BigInteger, nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("last_modified", String(40), nullable=False),
)

log_events = Table(
    "log_events",
    metadata,
    # BigInteger for PostgreSQL; on SQLite only INTEGER PRIMARY KEY is an autoincrementing rowid.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("workspace", String(64), nullable=False),
    Column("function", String(64), nullable=False),
    Column("stream", String(200), nullable=False),
    Column("invocation_id", String(64), nullable=True),
    Column("ts_ms", BigInteger, nullable=False),
    Column("message", Text, nullable=False),
    Index("ix_log_events_function_id", "workspace", "function", "id"),
    Index("ix_log_events_function_ts", "workspace", "function", "ts_ms"),
    Index("ix_log_events_invocation", "invocation_id"),
)

workspaces = Table(
    "workspaces",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("plan", String(16), nullable=False),
    Column("created_at", String(40), nullable=False),
)

# --- async events ---

# Events of asynchronous invocations (hxb.queue): `pending` ones wait for an attempt (or are
# running), `dead` ones are the function's dead-letter list. An event that succeeded or was
# handed to a destination function is deleted, in the transaction that enqueues the handover.
async_events = Table(
    "async_events",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("workspace", String(64), nullable=False),
    Column("function", String(64), nullable=False),
    Column("invoked_arn", String(300), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("client_context", JSON, nullable=True),
    Column("enqueued_at_ms", BigInteger, nullable=False),
    Column("due_at_ms", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("error_type", String(200), nullable=True),
    Column("error_payload", LargeBinary, nullable=True),
    Column("dead_reason", String(32), nullable=True),
    Column("dead_at_ms", BigInteger, nullable=True),
    Index("ix_async_events_state_due", "state", "due_at_ms"),
    Index("ix_async_events_function", "workspace", "function", "state"),
)
