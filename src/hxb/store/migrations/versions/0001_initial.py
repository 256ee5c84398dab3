"""Functions and log events.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "functions",
        sa.Column("workspace", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("revision_id", sa.String(64), nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("code_sha256", sa.String(64), nullable=False),
        sa.Column("code_size_bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("last_modified", sa.String(40), nullable=False),
    )
    op.create_table(
        "log_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("workspace", sa.String(64), nullable=False),
        sa.Column("function", sa.String(64), nullable=False),
        sa.Column("stream", sa.String(200), nullable=False),
        sa.Column("invocation_id", sa.String(64), nullable=True),
        sa.Column("ts_ms", sa.BigInteger, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
    )
    op.create_index("ix_log_events_function_id", "log_events", ["workspace", "function", "id"])
    op.create_index("ix_log_events_function_ts", "log_events", ["workspace", "function", "ts_ms"])
    op.create_index("ix_log_events_invocation", "log_events", ["invocation_id"])


def downgrade() -> None:
    op.drop_table("log_events")
    op.drop_table("functions")
