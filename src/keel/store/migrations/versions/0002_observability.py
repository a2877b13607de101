"""Observability: hourly and per-dimension rollups, spans, resource samples,
component checks, daemon leases, and the parent span of a gateway call.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

N_BUCKETS = 34  # frozen: keel.store.tables.N_BUCKETS at this revision


def _sums() -> list[sa.Column]:
    return [
        *(
            sa.Column(n, sa.BigInteger, nullable=False)
            for n in (
                "requests",
                "errors",
                "streams",
                "prompt_tokens",
                "completion_tokens",
                "total_tokens",
            )
        ),
        sa.Column("latency_sum_ms", sa.Float, nullable=False),
        sa.Column("ttft_count", sa.BigInteger, nullable=False),
        sa.Column("ttft_sum_ms", sa.Float, nullable=False),
        sa.Column("cost_usd", sa.Float, nullable=False),
        *(sa.Column(f"lat_b{i}", sa.BigInteger, nullable=False) for i in range(N_BUCKETS)),
        *(sa.Column(f"ttft_b{i}", sa.BigInteger, nullable=False) for i in range(N_BUCKETS)),
    ]


def upgrade() -> None:
    with op.batch_alter_table("traces") as b:
        b.add_column(sa.Column("otel_parent_span_id", sa.String(16)))
    op.create_index("ix_traces_otel_trace", "traces", ["otel_trace_id"])

    op.create_table(
        "rollups_hour",
        sa.Column("minute_ms", sa.BigInteger, primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("provider", sa.String(100), primary_key=True),
        sa.Column("endpoint", sa.String(32), primary_key=True),
        sa.Column("status", sa.String(16), primary_key=True),
        *_sums(),
    )
    op.create_index("ix_rollups_hour", "rollups_hour", ["minute_ms"])
    op.create_table(
        "rollups_dim_minute",
        sa.Column("minute_ms", sa.BigInteger, primary_key=True),
        sa.Column("dimension", sa.String(16), primary_key=True),
        sa.Column("value", sa.String(200), primary_key=True),
        sa.Column("status", sa.String(16), primary_key=True),
        *_sums(),
    )
    op.create_index("ix_rollups_dim_minute", "rollups_dim_minute", ["dimension", "minute_ms"])

    op.create_table(
        "spans",
        sa.Column("trace_id", sa.String(32), primary_key=True),
        sa.Column("span_id", sa.String(16), primary_key=True),
        sa.Column("parent_span_id", sa.String(16)),
        sa.Column("name", sa.String(300), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("service", sa.String(200)),
        sa.Column("start_us", sa.BigInteger, nullable=False),
        sa.Column("end_us", sa.BigInteger, nullable=False),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_message", sa.Text),
        sa.Column("model", sa.String(200)),
        sa.Column("prompt_tokens", sa.Integer),
        sa.Column("completion_tokens", sa.Integer),
        sa.Column("input", sa.Text),
        sa.Column("output", sa.Text),
        sa.Column("result_count", sa.Integer),
        sa.Column("top_score", sa.Float),
        sa.Column("attributes", sa.Text),
        sa.Column("events", sa.Text),
    )
    op.create_index("ix_spans_start", "spans", ["start_us"])
    op.create_index("ix_spans_kind_start", "spans", ["kind", "start_us"])

    op.create_table(
        "resource_samples",
        sa.Column("ts_ms", sa.BigInteger, primary_key=True),
        sa.Column("instance", sa.String(120), primary_key=True),
        sa.Column("process_cpu_percent", sa.Float),
        sa.Column("host_cpu_percent", sa.Float),
        sa.Column("process_rss_bytes", sa.BigInteger),
        sa.Column("host_mem_used_bytes", sa.BigInteger),
        sa.Column("host_mem_total_bytes", sa.BigInteger),
        sa.Column("open_connections", sa.Integer),
        sa.Column("loop_lag_ms", sa.Float),
        sa.Column("gpu", sa.Text),
        sa.Column("recorder_queue_depth", sa.Integer),
        sa.Column("recorder_spilled", sa.BigInteger),
        sa.Column("recorder_dropped", sa.BigInteger),
    )
    op.create_table(
        "component_checks",
        sa.Column("ts_ms", sa.BigInteger, primary_key=True),
        sa.Column("component", sa.String(200), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("up", sa.Boolean, nullable=False),
        sa.Column("latency_ms", sa.Float),
        sa.Column("error", sa.Text),
    )
    op.create_index("ix_component_checks_component_ts", "component_checks", ["component", "ts_ms"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("expires_at_ms", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    for t in (
        "leases",
        "component_checks",
        "resource_samples",
        "spans",
        "rollups_dim_minute",
        "rollups_hour",
    ):
        op.drop_table(t)
    op.drop_index("ix_traces_otel_trace", "traces")
    with op.batch_alter_table("traces") as b:
        b.drop_column("otel_parent_span_id")
