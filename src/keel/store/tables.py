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
    Index("ix_traces_started", "started_at_ms"),
    Index("ix_traces_model_started", "model", "started_at_ms"),
    Index("ix_traces_user_started", "user_id", "started_at_ms"),
    Index("ix_traces_feature_started", "feature", "started_at_ms"),
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

rollups_minute = Table(
    "rollups_minute",
    metadata,
    Column("minute_ms", BigInteger, primary_key=True),
    Column("model", String(200), primary_key=True),
    Column("provider", String(100), primary_key=True),
    Column("endpoint", String(32), primary_key=True),
    Column("status", String(16), primary_key=True),
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
    Index("ix_rollups_minute", "minute_ms"),
)
