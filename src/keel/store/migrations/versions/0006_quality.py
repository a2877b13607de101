"""Quality monitoring: experiments, scores, the online evaluation queue, drift.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("suite", sa.String(200), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("resume_key", sa.String(64), nullable=False),
        sa.Column("dataset_version_id", sa.String(64)),
        sa.Column("model", sa.String(200)),
        sa.Column("prompt_ref", sa.String(300)),
        sa.Column("params", sa.Text()),
        sa.Column("config", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("items_total", sa.Integer(), nullable=False),
        sa.Column("items_done", sa.Integer(), nullable=False),
        sa.Column("summary", sa.Text()),
        sa.Column("started_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("finished_at_ms", sa.BigInteger()),
        sa.Column("created_by", sa.String(200)),
    )
    op.create_index("ix_eval_runs_suite", "eval_runs", ["suite", "started_at_ms"])
    op.create_index("ix_eval_runs_resume", "eval_runs", ["resume_key"])
    op.create_table(
        "eval_items",
        sa.Column("run_id", sa.String(32), primary_key=True),
        sa.Column("item_key", sa.String(64), primary_key=True),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("input", sa.Text()),
        sa.Column("expected", sa.Text()),
        sa.Column("output", sa.Text()),
        sa.Column("error", sa.Text()),
        sa.Column("prompt_tokens", sa.Integer()),
        sa.Column("completion_tokens", sa.Integer()),
        sa.Column("latency_ms", sa.Float()),
        sa.Column("cost_usd", sa.Float()),
        sa.Column("trace_id", sa.String(32)),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("scores", sa.Text()),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "eval_cache",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("response", sa.Text(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "scores",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("trace_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("value", sa.Float()),
        sa.Column("label", sa.String(200)),
        sa.Column("comment", sa.Text()),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("evaluator", sa.String(200)),
        sa.Column("details", sa.Text()),
        sa.Column("model", sa.String(200)),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("created_by", sa.String(200)),
        sa.Column("dedup_key", sa.String(300), unique=True),
    )
    op.create_index("ix_scores_trace", "scores", ["trace_id"])
    op.create_index("ix_scores_name_created", "scores", ["name", "created_at_ms"])
    op.create_table(
        "score_rollups_minute",
        sa.Column("minute_ms", sa.BigInteger(), primary_key=True),
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("source", sa.String(16), primary_key=True),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("value_sum", sa.Float(), nullable=False),
        sa.Column("passed", sa.BigInteger(), nullable=False),
        sa.Column("failed", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_score_rollups_minute", "score_rollups_minute", ["minute_ms"])
    op.create_table(
        "eval_jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("trace_id", sa.String(32), nullable=False),
        sa.Column("evaluator", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_ms", sa.BigInteger(), nullable=False),
        sa.Column("claimed_by", sa.String(200)),
        sa.Column("claimed_until_ms", sa.BigInteger()),
        sa.Column("last_error", sa.Text()),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("finished_at_ms", sa.BigInteger()),
    )
    op.create_index("ix_eval_jobs_status_next", "eval_jobs", ["status", "next_attempt_ms"])
    op.create_index(
        "ux_eval_jobs_trace_evaluator", "eval_jobs", ["trace_id", "evaluator"], unique=True
    )
    op.create_table(
        "cursors",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("position", sa.String(200), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "trace_features",
        sa.Column("trace_id", sa.String(32), primary_key=True),
        sa.Column("started_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(200)),
        sa.Column("feature", sa.String(200)),
        sa.Column("input_tokens", sa.Integer()),
        sa.Column("output_tokens", sa.Integer()),
        sa.Column("latency_ms", sa.Float()),
        sa.Column("language", sa.String(16)),
        sa.Column("refusal", sa.Boolean()),
        sa.Column("retrieval_top_score", sa.Float()),
        sa.Column("retrieval_count", sa.Integer()),
        sa.Column("input_text", sa.Text()),
        sa.Column("input_embedding", sa.Text()),
        sa.Column("output_embedding", sa.Text()),
    )
    op.create_index("ix_trace_features_started", "trace_features", ["started_at_ms"])
    op.create_table(
        "drift_runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("monitor", sa.String(200), nullable=False),
        sa.Column("computed_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("window_start_ms", sa.BigInteger(), nullable=False),
        sa.Column("window_end_ms", sa.BigInteger(), nullable=False),
        sa.Column("reference", sa.Text(), nullable=False),
        sa.Column("n_current", sa.Integer(), nullable=False),
        sa.Column("n_reference", sa.Integer(), nullable=False),
        sa.Column("drifted", sa.Boolean(), nullable=False),
        sa.Column("report", sa.Text()),
    )
    op.create_index("ix_drift_runs_monitor", "drift_runs", ["monitor", "computed_at_ms"])
    op.create_table(
        "drift_scores",
        sa.Column("run_id", sa.String(32), primary_key=True),
        sa.Column("feature", sa.String(100), primary_key=True),
        sa.Column("test", sa.String(32), primary_key=True),
        sa.Column("monitor", sa.String(200), nullable=False),
        sa.Column("computed_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("statistic", sa.Float()),
        sa.Column("p_value", sa.Float()),
        sa.Column("threshold", sa.Float()),
        sa.Column("drifted", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_drift_scores_monitor", "drift_scores", ["monitor", "computed_at_ms"])


def downgrade() -> None:
    op.drop_table("drift_scores")
    op.drop_table("drift_runs")
    op.drop_table("trace_features")
    op.drop_table("cursors")
    op.drop_table("eval_jobs")
    op.drop_table("score_rollups_minute")
    op.drop_table("scores")
    op.drop_table("eval_cache")
    op.drop_table("eval_items")
    op.drop_table("eval_runs")
