"""Tables, in SQLAlchemy Core. One schema for SQLite and PostgreSQL.

Migrations under ``migrations/versions`` create these; a test checks that the
migrated database and this metadata agree.
"""

from __future__ import annotations

import math

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

traces = Table(
    "traces",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("started_at_ms", BigInteger, nullable=False),
    Column("duration_ms", Float, nullable=False),
    Column("ttft_ms", Float),
    Column("endpoint", String(32), nullable=False),
    Column("model", String(200), nullable=False),
    Column("provider", String(100)),
    Column("upstream_model", String(200)),
    Column("status", String(16), nullable=False),
    Column("http_status", Integer, nullable=False),
    Column("error_type", String(64)),
    Column("error_message", Text),
    Column("stream", Boolean, nullable=False, default=False),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("total_tokens", Integer),
    Column("tokens_estimated", Boolean, nullable=False, default=False),
    Column("user_id", String(200)),
    Column("feature", String(200)),
    Column("session_id", String(200)),
    Column("tags", Text),
    Column("client_addr", String(64)),
    Column("request_body", Text),
    Column("response_body", Text),
    Column("cost_usd", Float),
    Column("api_key_id", String(64)),
    Column("otel_trace_id", String(32)),
    Column("otel_span_id", String(16)),
    Column("otel_parent_span_id", String(16)),
    Column("cached_tokens", Integer),  # prompt tokens read from the provider's cache
    Column("cache_write_tokens", Integer),  # prompt tokens written to it (Anthropic)
    Column("reasoning_tokens", Integer),  # part of completion_tokens
    Column("cache_hit", Boolean),  # answered from Keel's response cache
    Column("prompt_version_id", String(32)),  # the prompt version the call rendered
    Column("route_version", String(200)),  # registry model@version that served it
    Index("ix_traces_started", "started_at_ms"),
    Index("ix_traces_model_started", "model", "started_at_ms"),
    Index("ix_traces_user_started", "user_id", "started_at_ms"),
    Index("ix_traces_feature_started", "feature", "started_at_ms"),
    Index("ix_traces_otel_trace", "otel_trace_id"),
)

# Latency histograms use fixed log-spaced buckets, so rollups from any number of
# writers add up and percentiles can be read back from sums. Upper bounds in ms:
# 1, 1.5, 2.25, … 1.5**32 (≈ 7.2 min); the last bucket catches everything above.
# The ratio 1.5 bounds the error of an interpolated percentile to about ±20 %.
BUCKET_RATIO = 1.5
BUCKET_BOUNDS_MS: tuple[float, ...] = tuple(BUCKET_RATIO**i for i in range(33))
N_BUCKETS = len(BUCKET_BOUNDS_MS) + 1
LAT_COLS = tuple(f"lat_b{i}" for i in range(N_BUCKETS))
TTFT_COLS = tuple(f"ttft_b{i}" for i in range(N_BUCKETS))
_LOG_RATIO = math.log(BUCKET_RATIO)


def bucket_index(ms: float) -> int:
    """Index of the histogram bucket holding a duration in milliseconds."""
    if ms <= 1.0:
        return 0
    i = math.ceil(math.log(ms) / _LOG_RATIO - 1e-9)
    return i if i < N_BUCKETS - 1 else N_BUCKETS - 1


ROLLUP_KEYS = ("minute_ms", "model", "provider", "endpoint", "status")
ROLLUP_SUMS = (
    "requests",
    "errors",
    "streams",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "latency_sum_ms",
    "ttft_count",
    "ttft_sum_ms",
    "cost_usd",
)


def _sum_columns() -> list[Column]:
    return [
        Column("requests", BigInteger, nullable=False, default=0),
        Column("errors", BigInteger, nullable=False, default=0),
        Column("streams", BigInteger, nullable=False, default=0),
        Column("prompt_tokens", BigInteger, nullable=False, default=0),
        Column("completion_tokens", BigInteger, nullable=False, default=0),
        Column("total_tokens", BigInteger, nullable=False, default=0),
        Column("latency_sum_ms", Float, nullable=False, default=0.0),
        Column("ttft_count", BigInteger, nullable=False, default=0),
        Column("ttft_sum_ms", Float, nullable=False, default=0.0),
        Column("cost_usd", Float, nullable=False, default=0.0),
        *(Column(c, BigInteger, nullable=False, default=0) for c in LAT_COLS),
        *(Column(c, BigInteger, nullable=False, default=0) for c in TTFT_COLS),
    ]


rollups_minute = Table(
    "rollups_minute",
    metadata,
    Column("minute_ms", BigInteger, primary_key=True),
    Column("model", String(200), primary_key=True),
    Column("provider", String(100), primary_key=True),
    Column("endpoint", String(32), primary_key=True),
    Column("status", String(16), primary_key=True),
    *_sum_columns(),
    Index("ix_rollups_minute", "minute_ms"),
)

# The same sums per hour: summaries over days read 60x fewer rows.
rollups_hour = Table(
    "rollups_hour",
    metadata,
    Column("minute_ms", BigInteger, primary_key=True),  # start of the hour
    Column("model", String(200), primary_key=True),
    Column("provider", String(100), primary_key=True),
    Column("endpoint", String(32), primary_key=True),
    Column("status", String(16), primary_key=True),
    *_sum_columns(),
    Index("ix_rollups_hour", "minute_ms"),
)

# Per-minute sums by one attribution dimension ("feature" or "user"), for
# summaries grouped by them; kept apart so the main rollups stay small.
rollups_dim_minute = Table(
    "rollups_dim_minute",
    metadata,
    Column("minute_ms", BigInteger, primary_key=True),
    Column("dimension", String(16), primary_key=True),
    Column("value", String(200), primary_key=True),
    Column("status", String(16), primary_key=True),
    *_sum_columns(),
    Index("ix_rollups_dim_minute", "dimension", "minute_ms"),
)

# Spans sent by applications over OTLP (and the SDK). Times in microseconds.
spans = Table(
    "spans",
    metadata,
    Column("trace_id", String(32), primary_key=True),
    Column("span_id", String(16), primary_key=True),
    Column("parent_span_id", String(16)),
    Column("name", String(300), nullable=False),
    Column("kind", String(32), nullable=False),  # llm, retrieval, vector-db, tool, chain, …
    Column("service", String(200)),
    Column("start_us", BigInteger, nullable=False),
    Column("end_us", BigInteger, nullable=False),
    Column("duration_ms", Float, nullable=False),
    Column("status", String(16), nullable=False),  # ok | error | unset
    Column("status_message", Text),
    Column("model", String(200)),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("input", Text),
    Column("output", Text),
    Column("result_count", Integer),
    Column("top_score", Float),
    Column("attributes", Text),  # JSON: every attribute, known ones included
    Column("events", Text),  # JSON list
    Index("ix_spans_start", "start_us"),
    Index("ix_spans_kind_start", "kind", "start_us"),
)

resource_samples = Table(
    "resource_samples",
    metadata,
    Column("ts_ms", BigInteger, primary_key=True),
    Column("instance", String(120), primary_key=True),
    Column("process_cpu_percent", Float),
    Column("host_cpu_percent", Float),
    Column("process_rss_bytes", BigInteger),
    Column("host_mem_used_bytes", BigInteger),
    Column("host_mem_total_bytes", BigInteger),
    Column("open_connections", Integer),
    Column("loop_lag_ms", Float),
    Column("gpu", Text),  # JSON list per device, null when there is no GPU
    Column("recorder_queue_depth", Integer),
    Column("recorder_spilled", BigInteger),  # cumulative since the process started
    Column("recorder_dropped", BigInteger),
)

component_checks = Table(
    "component_checks",
    metadata,
    Column("ts_ms", BigInteger, primary_key=True),
    Column("component", String(200), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("up", Boolean, nullable=False),
    Column("latency_ms", Float),
    Column("error", Text),
    Index("ix_component_checks_component_ts", "component", "ts_ms"),
)

# Leases for daemons that must run on one replica at a time.
leases = Table(
    "leases",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("holder", String(200), nullable=False),
    Column("expires_at_ms", BigInteger, nullable=False),
)

# -- alerts -------------------------------------------------------------------

# Rules created through the API (rules from keel.yaml live in the config).
alert_rules = Table(
    "alert_rules",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("spec", Text, nullable=False),  # JSON of RuleSettings
    Column("created_at_ms", BigInteger, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
)

# One row per rule and label set: the state machine, persisted so a restart
# neither loses a firing alert nor sends it again.
alert_states = Table(
    "alert_states",
    metadata,
    Column("rule", String(200), primary_key=True),
    Column("labels_key", String(500), primary_key=True),  # canonical "k=v,k2=v2"
    Column("labels", Text, nullable=False),  # JSON object
    Column("state", String(16), nullable=False),  # ok | pending | firing | resolved
    Column("value", Float),
    Column("threshold", Float),
    Column("pending_since_ms", BigInteger),
    Column("firing_since_ms", BigInteger),
    Column("resolved_at_ms", BigInteger),
    Column("last_eval_ms", BigInteger),
    Column("last_notified_ms", BigInteger),
    Column("severity", String(16)),
)

# Append-only history of state changes and notifications.
alert_events = Table(
    "alert_events",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("ts_ms", BigInteger, nullable=False),
    Column("rule", String(200), nullable=False),
    Column("labels_key", String(500), nullable=False),
    Column("labels", Text, nullable=False),
    Column("kind", String(16), nullable=False),  # pending|firing|resolved|renotify|silenced
    Column("value", Float),
    Column("threshold", Float),
    Column("severity", String(16)),
    Column("message", Text),
    Index("ix_alert_events_rule_ts", "rule", "ts_ms"),
    Index("ix_alert_events_ts", "ts_ms"),
)

alert_silences = Table(
    "alert_silences",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("rule", String(200)),  # null: any rule
    Column("matchers", Text, nullable=False),  # JSON object of label=value
    Column("starts_at_ms", BigInteger, nullable=False),
    Column("ends_at_ms", BigInteger, nullable=False),
    Column("created_by", String(200)),
    Column("comment", Text),
)

alert_deliveries = Table(
    "alert_deliveries",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("ts_ms", BigInteger, nullable=False),
    Column("channel", String(200), nullable=False),
    Column("kind", String(16), nullable=False),  # channel kind
    Column("status", String(16), nullable=False),  # sent | failed
    Column("attempts", Integer, nullable=False),
    Column("error", Text),
    Column("alerts", Text, nullable=False),  # JSON list of {rule, labels, kind}
    Index("ix_alert_deliveries_ts", "ts_ms"),
)


# -- keys and audit -------------------------------------------------------------

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("prefix", String(16), nullable=False),  # shown in lists: "sk-keel-ab12…"
    Column("hash", String(128), nullable=False, unique=True),  # sha256 of the secret
    Column("role", String(16), nullable=False),  # admin | approver | read | user
    Column("budget_usd", Float),
    Column("budget_period", String(8)),  # day | week | month
    Column("rpm", Integer),
    Column("tpm", Integer),
    Column("models", Text),  # JSON list of allowed aliases; null: all
    Column("created_at_ms", BigInteger, nullable=False),
    Column("expires_at_ms", BigInteger),
    Column("revoked_at_ms", BigInteger),
    Column("created_by", String(200)),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("ts_ms", BigInteger, nullable=False),
    Column("principal", String(200), nullable=False),  # key id or "admin-env" / "cli"
    Column("action", String(100), nullable=False),
    Column("target", String(300)),
    Column("details", Text),  # JSON
    Column("status", Integer),
    Index("ix_audit_log_ts", "ts_ms"),
)

# -- datasets and prompts --------------------------------------------------------

datasets = Table(
    "datasets",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("kind", String(16), nullable=False),  # chat | completion | eval
    Column("description", Text),
    Column("created_at_ms", BigInteger, nullable=False),
)

# Immutable versions, identified by the content hash of their rows.
dataset_versions = Table(
    "dataset_versions",
    metadata,
    Column("id", String(64), primary_key=True),  # content hash (sha256 hex)
    Column("dataset", String(200), nullable=False),
    Column("parent_id", String(64)),
    Column("rows", BigInteger, nullable=False),
    Column("splits", Text),  # JSON {"train": n, "validation": n, …}
    Column("uri", Text, nullable=False),  # where the Parquet files are (fsspec URL)
    Column("steps", Text),  # JSON list of {step, params}: the lineage
    Column("source", Text),  # JSON: the imported file or trace filter
    Column("created_at_ms", BigInteger, nullable=False),
    Column("created_by", String(200)),
    Column("validation", Text),  # JSON summary of the last validation report
    Index("ix_dataset_versions_dataset", "dataset", "created_at_ms"),
)

prompts = Table(
    "prompts",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("description", Text),
    Column("created_at_ms", BigInteger, nullable=False),
)

prompt_versions = Table(
    "prompt_versions",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("prompt", String(200), nullable=False),
    Column("version", Integer, nullable=False),  # 1, 2, 3 … per prompt
    Column("content_hash", String(64), nullable=False),
    Column("spec", Text, nullable=False),  # JSON: template, variables, model, params
    Column("created_at_ms", BigInteger, nullable=False),
    Column("created_by", String(200)),
    Column("message", Text),
    Index("ux_prompt_versions_prompt_version", "prompt", "version", unique=True),
)

prompt_labels = Table(
    "prompt_labels",
    metadata,
    Column("prompt", String(200), primary_key=True),
    Column("label", String(100), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
    Column("updated_by", String(200)),
)

# Quality-monitoring tables live in their own module (the schema is still one).
from keel.store import tables_deploy as _deploy  # noqa: E402, F401
from keel.store import tables_pipelines as _pipelines  # noqa: E402, F401
from keel.store import tables_quality as _quality  # noqa: E402, F401
from keel.store import tables_registry as _registry  # noqa: E402, F401
