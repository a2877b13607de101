"""Tracked runs and the model registry.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("experiment", sa.String(200)),
        sa.Column("pipeline_run_id", sa.String(64)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("tags", sa.Text()),
        sa.Column("inputs", sa.Text()),
        sa.Column("code", sa.Text()),
        sa.Column("environment", sa.Text()),
        sa.Column("metrics", sa.Text()),
        sa.Column("host", sa.String(200)),
        sa.Column("created_by", sa.String(200)),
        sa.Column("started_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("ended_at_ms", sa.BigInteger()),
    )
    op.create_index("ix_runs_started", "runs", ["started_at_ms"])
    op.create_index("ix_runs_name_started", "runs", ["name", "started_at_ms"])
    op.create_index("ix_runs_experiment_started", "runs", ["experiment", "started_at_ms"])
    op.create_index("ix_runs_pipeline", "runs", ["pipeline_run_id"])
    op.create_table(
        "run_params",
        sa.Column("run_id", sa.String(32), primary_key=True),
        sa.Column("key", sa.String(250), primary_key=True),
        sa.Column("value", sa.Text()),
    )
    op.create_table(
        "run_metrics",
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("key", sa.String(250), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("value", sa.Float()),
        sa.Column("ts_ms", sa.BigInteger(), nullable=False),
    )
    op.create_index(
        "ix_run_metrics_curve", "run_metrics", ["run_id", "key", "step", "ts_ms", "value"]
    )
    op.create_table(
        "run_artifacts",
        sa.Column("run_id", sa.String(32), primary_key=True),
        sa.Column("path", sa.String(500), primary_key=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("uri", sa.String(1000), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "registered_models",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("description", sa.Text()),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("created_by", sa.String(200)),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "model_versions",
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("source_run_id", sa.String(32)),
        sa.Column("artifact_uri", sa.String(1000)),
        sa.Column("deployment", sa.Text()),
        sa.Column("metrics", sa.Text()),
        sa.Column("lineage", sa.Text()),
        sa.Column("card", sa.Text()),
        sa.Column("description", sa.Text()),
        sa.Column("created_by", sa.String(200)),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_model_versions_run", "model_versions", ["source_run_id"])
    op.create_table(
        "model_aliases",
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("alias", sa.String(100), primary_key=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_by", sa.String(200)),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "approvals",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("principal", sa.String(200), nullable=False),
        sa.Column("note", sa.Text()),
        sa.Column("ts_ms", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_approvals_model_version", "approvals", ["model", "version"])


def downgrade() -> None:
    op.drop_table("approvals")
    op.drop_table("model_aliases")
    op.drop_table("model_versions")
    op.drop_table("registered_models")
    op.drop_table("run_artifacts")
    op.drop_table("run_metrics")
    op.drop_table("run_params")
    op.drop_table("runs")
