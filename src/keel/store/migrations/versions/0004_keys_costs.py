"""Virtual keys, the audit log, and usage details of traces for exact costs.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("traces") as b:
        b.add_column(sa.Column("cached_tokens", sa.Integer))
        b.add_column(sa.Column("cache_write_tokens", sa.Integer))
        b.add_column(sa.Column("reasoning_tokens", sa.Integer))
        b.add_column(sa.Column("cache_hit", sa.Boolean))
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("hash", sa.String(128), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("budget_usd", sa.Float),
        sa.Column("budget_period", sa.String(8)),
        sa.Column("rpm", sa.Integer),
        sa.Column("tpm", sa.Integer),
        sa.Column("models", sa.Text),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.Column("expires_at_ms", sa.BigInteger),
        sa.Column("revoked_at_ms", sa.BigInteger),
        sa.Column("created_by", sa.String(200)),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("ts_ms", sa.BigInteger, nullable=False),
        sa.Column("principal", sa.String(200), nullable=False),
        sa.Column("action", sa.String(100), nullable=False),
        sa.Column("target", sa.String(300)),
        sa.Column("details", sa.Text),
        sa.Column("status", sa.Integer),
    )
    op.create_index("ix_audit_log_ts", "audit_log", ["ts_ms"])


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_table("api_keys")
    with op.batch_alter_table("traces") as b:
        for c in ("cache_hit", "reasoning_tokens", "cache_write_tokens", "cached_tokens"):
            b.drop_column(c)
