"""Traces and per-minute rollups.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

N_BUCKETS = 34  # frozen here: keel.store.tables.N_BUCKETS at this revision


def upgrade() -> None:
    op.create_table(
        "traces",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("started_at_ms", sa.BigInteger, nullable=False),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("ttft_ms", sa.Float),
        sa.Column("endpoint", sa.String(32), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("provider", sa.String(100)),
        sa.Column("upstream_model", sa.String(200)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("http_status", sa.Integer, nullable=False),
        sa.Column("error_type", sa.String(64)),
        sa.Column("error_message", sa.Text),
        sa.Column("stream", sa.Boolean, nullable=False),
        sa.Column("prompt_tokens", sa.Integer),
        sa.Column("completion_tokens", sa.Integer),
        sa.Column("total_tokens", sa.Integer),
        sa.Column("tokens_estimated", sa.Boolean, nullable=False),
        sa.Column("user_id", sa.String(200)),
        sa.Column("feature", sa.String(200)),
        sa.Column("session_id", sa.String(200)),
        sa.Column("tags", sa.Text),
        sa.Column("client_addr", sa.String(64)),
        sa.Column("request_body", sa.Text),
        sa.Column("response_body", sa.Text),
        sa.Column("cost_usd", sa.Float),
        sa.Column("api_key_id", sa.String(64)),
        sa.Column("otel_trace_id", sa.String(32)),
        sa.Column("otel_span_id", sa.String(16)),
    )
    op.create_index("ix_traces_started", "traces", ["started_at_ms"])
    op.create_index("ix_traces_model_started", "traces", ["model", "started_at_ms"])
    op.create_index("ix_traces_user_started", "traces", ["user_id", "started_at_ms"])
    op.create_index("ix_traces_feature_started", "traces", ["feature", "started_at_ms"])

    sums = [
        sa.Column(name, sa.BigInteger, nullable=False)
        for name in (
            "requests",
            "errors",
            "streams",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
        )
    ]
    op.create_table(
        "rollups_minute",
        sa.Column("minute_ms", sa.BigInteger, primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("provider", sa.String(100), primary_key=True),
        sa.Column("endpoint", sa.String(32), primary_key=True),
        sa.Column("status", sa.String(16), primary_key=True),
        *sums,
        sa.Column("latency_sum_ms", sa.Float, nullable=False),
        sa.Column("ttft_count", sa.BigInteger, nullable=False),
        sa.Column("ttft_sum_ms", sa.Float, nullable=False),
        sa.Column("cost_usd", sa.Float, nullable=False),
        *(sa.Column(f"lat_b{i}", sa.BigInteger, nullable=False) for i in range(N_BUCKETS)),
        *(sa.Column(f"ttft_b{i}", sa.BigInteger, nullable=False) for i in range(N_BUCKETS)),
    )
    op.create_index("ix_rollups_minute", "rollups_minute", ["minute_ms"])


def downgrade() -> None:
    op.drop_table("rollups_minute")
    op.drop_table("traces")
