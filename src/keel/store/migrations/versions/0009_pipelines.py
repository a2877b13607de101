"""Pipelines: pipeline runs (with their trigger and links) and their steps.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pipeline_runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("file", sa.Text()),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("trigger_kind", sa.String(16), nullable=False),
        sa.Column("trigger_reason", sa.Text()),
        sa.Column("error", sa.Text()),
        sa.Column("links", sa.Text()),
        sa.Column("log_path", sa.Text()),
        sa.Column("created_by", sa.String(200)),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("started_at_ms", sa.BigInteger()),
        sa.Column("ended_at_ms", sa.BigInteger()),
    )
    op.create_index(
        "ix_pipeline_runs_pipeline_created", "pipeline_runs", ["pipeline", "created_at_ms"]
    )
    op.create_index("ix_pipeline_runs_created", "pipeline_runs", ["created_at_ms"])
    op.create_table(
        "pipeline_steps",
        sa.Column("pipeline_run_id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("input_hash", sa.String(64)),
        sa.Column("outputs", sa.Text()),
        sa.Column("reused_from", sa.String(32)),
        sa.Column("error", sa.Text()),
        sa.Column("started_at_ms", sa.BigInteger()),
        sa.Column("ended_at_ms", sa.BigInteger()),
    )
    op.create_index("ix_pipeline_steps_hash", "pipeline_steps", ["name", "input_hash"])


def downgrade() -> None:
    op.drop_table("pipeline_steps")
    op.drop_table("pipeline_runs")
