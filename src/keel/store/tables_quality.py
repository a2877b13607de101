"""Tables of quality monitoring: experiments, scores, the online work queue, drift.

Part of the one schema (imported by :mod:`keel.store.tables`); migration 0006
creates them.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Float, Index, Integer, String, Table, Text

from keel.store.tables import metadata

# -- offline experiments ---------------------------------------------------------

# One run = one target (prompt version x model alias x params) of a suite over
# one dataset version. A suite with three targets makes three runs.
eval_runs = Table(
    "eval_runs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("suite", String(200), nullable=False),
    Column("target", String(200), nullable=False),  # the target's name in the suite
    Column("resume_key", String(64), nullable=False),  # hash of suite content x target
    Column("dataset_version_id", String(64)),
    Column("model", String(200)),
    Column("prompt_ref", String(300)),  # name@version of the prompt, when one is used
    Column("params", Text),  # JSON
    Column("config", Text, nullable=False),  # JSON: the whole suite as run
    Column("status", String(16), nullable=False),  # running | completed | failed
    Column("items_total", Integer, nullable=False, default=0),
    Column("items_done", Integer, nullable=False, default=0),
    Column("summary", Text),  # JSON: per-evaluator means, tokens, cost, latency, gates
    Column("started_at_ms", BigInteger, nullable=False),
    Column("finished_at_ms", BigInteger),
    Column("created_by", String(200)),
    Index("ix_eval_runs_suite", "suite", "started_at_ms"),
    Index("ix_eval_runs_resume", "resume_key"),
)

eval_items = Table(
    "eval_items",
    metadata,
    Column("run_id", String(32), primary_key=True),
    Column("item_key", String(64), primary_key=True),  # the dataset row's id or hash
    Column("idx", Integer, nullable=False),  # position in the dataset
    Column("input", Text),  # JSON: the row's input / messages as rendered
    Column("expected", Text),
    Column("output", Text),
    Column("error", Text),  # the call failed: why
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("latency_ms", Float),
    Column("cost_usd", Float),
    Column("trace_id", String(32)),  # the gateway trace of the call
    Column("cached", Boolean, nullable=False, default=False),  # output from the cache
    Column("scores", Text),  # JSON {evaluator: {value, label, passed, reasoning, …}}
    Column("created_at_ms", BigInteger, nullable=False),
)

# Model outputs by request content, so an identical call is never paid twice.
eval_cache = Table(
    "eval_cache",
    metadata,
    Column("key", String(64), primary_key=True),  # sha256 of model + messages + params
    Column("response", Text, nullable=False),  # JSON: output, tokens, cost, latency
    Column("created_at_ms", BigInteger, nullable=False),
)

# -- scores on traces (online evaluators, judges, human feedback) -----------------

scores = Table(
    "scores",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("trace_id", String(32), nullable=False),
    Column("name", String(200), nullable=False),  # evaluator or feedback name
    Column("value", Float),
    Column("label", String(200)),
    Column("comment", Text),
    Column("source", String(16), nullable=False),  # online | human | sdk | api | label
    Column("evaluator", String(200)),  # evaluator kind (or judge model) that scored
    Column("details", Text),  # JSON: reasoning, judge model, prompt version, raw output
    Column("model", String(200)),  # the scored trace's model (for rollups and filters)
    Column("created_at_ms", BigInteger, nullable=False),
    Column("created_by", String(200)),
    # An online evaluator scores a trace once: (trace, name, source) is unique for
    # source=online through ``dedup_key``; human feedback may be given many times.
    Column("dedup_key", String(300), unique=True),
    Index("ix_scores_trace", "trace_id"),
    Index("ix_scores_name_created", "name", "created_at_ms"),
)

score_rollups_minute = Table(
    "score_rollups_minute",
    metadata,
    Column("minute_ms", BigInteger, primary_key=True),
    Column("name", String(200), primary_key=True),
    Column("model", String(200), primary_key=True),
    Column("source", String(16), primary_key=True),
    Column("count", BigInteger, nullable=False, default=0),
    Column("value_sum", Float, nullable=False, default=0.0),
    Column("passed", BigInteger, nullable=False, default=0),
    Column("failed", BigInteger, nullable=False, default=0),
    Index("ix_score_rollups_minute", "minute_ms"),
)

# The online evaluation work queue: one job per (trace, evaluator), claimed with
# an expiry so a dead worker's job is taken up again.
eval_jobs = Table(
    "eval_jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("trace_id", String(32), nullable=False),
    Column("evaluator", String(200), nullable=False),
    Column("status", String(16), nullable=False),  # pending | running | done | failed | skipped
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_ms", BigInteger, nullable=False),
    Column("claimed_by", String(200)),
    Column("claimed_until_ms", BigInteger),
    Column("last_error", Text),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("finished_at_ms", BigInteger),
    Index("ux_eval_jobs_trace_evaluator", "trace_id", "evaluator", unique=True),
    Index("ix_eval_jobs_status_next", "status", "next_attempt_ms"),
)

# Progress markers of scanning daemons (the last trace each one has seen).
cursors = Table(
    "cursors",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("position", String(200), nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
)

# -- drift ------------------------------------------------------------------------

# Features of a trace, computed after it is stored (sampled).
trace_features = Table(
    "trace_features",
    metadata,
    Column("trace_id", String(32), primary_key=True),
    Column("started_at_ms", BigInteger, nullable=False),
    Column("model", String(200)),
    Column("feature", String(200)),
    Column("input_tokens", Integer),
    Column("output_tokens", Integer),
    Column("latency_ms", Float),
    Column("language", String(16)),
    Column("refusal", Boolean),
    Column("retrieval_top_score", Float),
    Column("retrieval_count", Integer),
    Column("input_text", Text),  # a prefix, for the examples in reports
    Column("input_embedding", Text),  # base64 float16 vector
    Column("output_embedding", Text),
    Index("ix_trace_features_started", "started_at_ms"),
)

drift_runs = Table(
    "drift_runs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("monitor", String(200), nullable=False),
    Column("computed_at_ms", BigInteger, nullable=False),
    Column("window_start_ms", BigInteger, nullable=False),
    Column("window_end_ms", BigInteger, nullable=False),
    Column("reference", Text, nullable=False),  # JSON: what was compared against
    Column("n_current", Integer, nullable=False),
    Column("n_reference", Integer, nullable=False),
    Column("drifted", Boolean, nullable=False),
    Column("report", Text),  # JSON: per-feature results, clusters, example inputs
    Index("ix_drift_runs_monitor", "monitor", "computed_at_ms"),
)

drift_scores = Table(
    "drift_scores",
    metadata,
    Column("run_id", String(32), primary_key=True),
    Column("feature", String(100), primary_key=True),
    Column("test", String(32), primary_key=True),
    Column("monitor", String(200), nullable=False),
    Column("computed_at_ms", BigInteger, nullable=False),
    Column("statistic", Float),
    Column("p_value", Float),
    Column("threshold", Float),
    Column("drifted", Boolean, nullable=False),
    Index("ix_drift_scores_monitor", "monitor", "computed_at_ms"),
)
