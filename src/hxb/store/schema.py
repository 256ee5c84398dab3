"""The store's tables (SQLAlchemy Core), shared by SQLite and PostgreSQL. Changes go through
an Alembic migration in `migrations/versions/`."""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Column, Index, Integer, MetaData, String, Table, Text

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
