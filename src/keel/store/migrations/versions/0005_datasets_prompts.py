"""Datasets with content-hashed versions; prompts with versions and labels.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("traces") as b:
        b.add_column(sa.Column("prompt_version_id", sa.String(32)))
    op.create_table(
        "datasets",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("description", sa.Text),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "dataset_versions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("dataset", sa.String(200), nullable=False),
        sa.Column("parent_id", sa.String(64)),
        sa.Column("rows", sa.BigInteger, nullable=False),
        sa.Column("splits", sa.Text),
        sa.Column("uri", sa.Text, nullable=False),
        sa.Column("steps", sa.Text),
        sa.Column("source", sa.Text),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.Column("created_by", sa.String(200)),
        sa.Column("validation", sa.Text),
    )
    op.create_index("ix_dataset_versions_dataset", "dataset_versions", ["dataset", "created_at_ms"])
    op.create_table(
        "prompts",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("description", sa.Text),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "prompt_versions",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("prompt", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.Column("created_by", sa.String(200)),
        sa.Column("message", sa.Text),
    )
    op.create_index(
        "ux_prompt_versions_prompt_version", "prompt_versions", ["prompt", "version"], unique=True
    )
    op.create_table(
        "prompt_labels",
        sa.Column("prompt", sa.String(200), primary_key=True),
        sa.Column("label", sa.String(100), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger, nullable=False),
        sa.Column("updated_by", sa.String(200)),
    )


def downgrade() -> None:
    for t in ("prompt_labels", "prompt_versions", "prompts", "dataset_versions", "datasets"):
        op.drop_table(t)
    with op.batch_alter_table("traces") as b:
        b.drop_column("prompt_version_id")
