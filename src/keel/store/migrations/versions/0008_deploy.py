"""Gated deployment: routes, deployments, their events, and the version a trace was served by.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("traces", sa.Column("route_version", sa.String(200)))
    op.create_table(
        "deploy_routes",
        sa.Column("alias", sa.String(200), primary_key=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("stable", sa.Text()),
        sa.Column("canary", sa.Text()),
        sa.Column("canary_share", sa.Float(), nullable=False),
        sa.Column("deployment_id", sa.String(32)),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_by", sa.String(200)),
    )
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("alias", sa.String(200), nullable=False),
        sa.Column("baseline_version", sa.Integer()),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("active_key", sa.String(200), unique=True),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("canary_share", sa.Float(), nullable=False),
        sa.Column("target", sa.Text()),
        sa.Column("worker", sa.String(200)),
        sa.Column("reason", sa.Text()),
        sa.Column("validation", sa.Text()),
        sa.Column("comparison", sa.Text()),
        sa.Column("notified_state", sa.String(32)),
        sa.Column("created_by", sa.String(200)),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("state_since_ms", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_deployments_model_created", "deployments", ["model", "created_at_ms"])
    op.create_index("ix_deployments_state", "deployments", ["state"])
    op.create_table(
        "deployment_events",
        sa.Column("deployment_id", sa.String(32), primary_key=True),
        sa.Column("seq", sa.Integer(), primary_key=True),
        sa.Column("from_state", sa.String(32)),
        sa.Column("to_state", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("details", sa.Text()),
        sa.Column("ts_ms", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("deployment_events")
    op.drop_table("deployments")
    op.drop_table("deploy_routes")
    with op.batch_alter_table("traces") as batch:
        batch.drop_column("route_version")
