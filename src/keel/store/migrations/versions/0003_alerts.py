"""Alerts: API-managed rules, rule states, events, silences, deliveries.

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
        "alert_rules",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "alert_states",
        sa.Column("rule", sa.String(200), primary_key=True),
        sa.Column("labels_key", sa.String(500), primary_key=True),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("value", sa.Float),
        sa.Column("threshold", sa.Float),
        sa.Column("pending_since_ms", sa.BigInteger),
        sa.Column("firing_since_ms", sa.BigInteger),
        sa.Column("resolved_at_ms", sa.BigInteger),
        sa.Column("last_eval_ms", sa.BigInteger),
        sa.Column("last_notified_ms", sa.BigInteger),
        sa.Column("severity", sa.String(16)),
    )
    op.create_table(
        "alert_events",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("ts_ms", sa.BigInteger, nullable=False),
        sa.Column("rule", sa.String(200), nullable=False),
        sa.Column("labels_key", sa.String(500), nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("value", sa.Float),
        sa.Column("threshold", sa.Float),
        sa.Column("severity", sa.String(16)),
        sa.Column("message", sa.Text),
    )
    op.create_index("ix_alert_events_rule_ts", "alert_events", ["rule", "ts_ms"])
    op.create_index("ix_alert_events_ts", "alert_events", ["ts_ms"])
    op.create_table(
        "alert_silences",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("rule", sa.String(200)),
        sa.Column("matchers", sa.Text, nullable=False),
        sa.Column("starts_at_ms", sa.BigInteger, nullable=False),
        sa.Column("ends_at_ms", sa.BigInteger, nullable=False),
        sa.Column("created_by", sa.String(200)),
        sa.Column("comment", sa.Text),
    )
    op.create_table(
        "alert_deliveries",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("ts_ms", sa.BigInteger, nullable=False),
        sa.Column("channel", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("alerts", sa.Text, nullable=False),
    )
    op.create_index("ix_alert_deliveries_ts", "alert_deliveries", ["ts_ms"])


def downgrade() -> None:
    for t in ("alert_deliveries", "alert_silences", "alert_events", "alert_states", "alert_rules"):
        op.drop_table(t)
