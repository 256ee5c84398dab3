"""Events of asynchronous invocations and dead letters.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "async_events",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("workspace", sa.String(64), nullable=False),
        sa.Column("function", sa.String(64), nullable=False),
        sa.Column("invoked_arn", sa.String(300), nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("client_context", sa.JSON, nullable=True),
        sa.Column("enqueued_at_ms", sa.BigInteger, nullable=False),
        sa.Column("due_at_ms", sa.BigInteger, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error_type", sa.String(200), nullable=True),
        sa.Column("error_payload", sa.LargeBinary, nullable=True),
        sa.Column("dead_reason", sa.String(32), nullable=True),
        sa.Column("dead_at_ms", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_async_events_state_due", "async_events", ["state", "due_at_ms"])
    op.create_index("ix_async_events_function", "async_events", ["workspace", "function", "state"])


def downgrade() -> None:
    op.drop_table("async_events")
