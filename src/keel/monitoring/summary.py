"""Summaries and time series read from the rollups (never from raw traces).

Windows longer than a few hours read whole hours from ``rollups_hour`` and only
the ragged edges from ``rollups_minute``, so a week is ~170 rows per series
instead of ~10,000.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, and_, cast, func, select
from sqlalchemy.engine import Engine

from keel.errors import InvalidRequest
from keel.store.rollups import percentile
from keel.store.tables import (
    LAT_COLS,
    ROLLUP_SUMS,
    TTFT_COLS,
    resource_samples,
    rollups_dim_minute,
    rollups_hour,
    rollups_minute,
)

MINUTE = 60_000
HOUR = 3_600_000
WINDOWS = {"5m": 5, "15m": 15, "1h": 60, "6h": 360, "24h": 1440, "7d": 10_080, "30d": 43_200}
STEPS = {"1m": 1, "5m": 5, "15m": 15, "1h": 60, "6h": 360, "1d": 1440}
GROUPS = ("model", "provider", "endpoint", "feature", "user", "none")
_SUMS = ROLLUP_SUMS + LAT_COLS + TTFT_COLS

COUNT_METRICS = (
    "requests",
    "errors",
    "streams",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
)
DERIVED_METRICS = (
    "rps",
    "error_rate",
    "latency_mean_ms",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "ttft_p99_ms",
)
RESOURCE_METRICS = (
    "process_cpu_percent",
    "host_cpu_percent",
    "process_rss_bytes",
    "host_mem_used_bytes",
    "open_connections",
    "loop_lag_ms",
    "recorder_queue_depth",
    "recorder_spilled",
    "recorder_dropped",
)
METRICS = COUNT_METRICS + DERIVED_METRICS + RESOURCE_METRICS


@dataclass(frozen=True)
class Range:
    start_ms: int
    end_ms: int  # exclusive

    @property
    def seconds(self) -> float:
        return (self.end_ms - self.start_ms) / 1000


def window_range(window: str, now_ms: int | None = None) -> Range:
    if window not in WINDOWS:
        raise InvalidRequest(
            f"'window' must be one of {', '.join(WINDOWS)}; got {window!r}", param="window"
        )
    now = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    end = now // MINUTE * MINUTE + MINUTE  # include the current, partial minute
    return Range(end - WINDOWS[window] * MINUTE, end)


def _pieces(r: Range, allow_hours: bool) -> list[tuple[Table, int, int]]:
    """Split a range into (table, start, end) reads: whole hours from the hourly table."""
    h0 = -(-r.start_ms // HOUR) * HOUR
    h1 = r.end_ms // HOUR * HOUR
    if not allow_hours or h1 - h0 < 2 * HOUR:
        return [(rollups_minute, r.start_ms, r.end_ms)]
    out = [(rollups_hour, h0, h1)]
    if r.start_ms < h0:
        out.append((rollups_minute, r.start_ms, h0))
    if h1 < r.end_ms:
        out.append((rollups_minute, h1, r.end_ms))
    return out


def _empty() -> dict[str, Any]:
    return dict.fromkeys(_SUMS, 0)


def _accumulate(acc: dict[str, Any], row: Any) -> None:
    m = row._mapping
    for c in _SUMS:
        acc[c] += m[c] or 0


def derive(acc: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Counts and sums → the figures people read (rates, means, percentiles)."""
    n = acc["requests"]
    lat = [acc[c] for c in LAT_COLS]
    ttft = [acc[c] for c in TTFT_COLS]
    return {
        "requests": n,
        "errors": acc["errors"],
        "error_rate": (acc["errors"] / n) if n else 0.0,
        "rps": n / seconds if seconds else 0.0,
        "streams": acc["streams"],
        "latency_mean_ms": (acc["latency_sum_ms"] / n) if n else None,
        "latency_p50_ms": percentile(lat, 0.50),
        "latency_p95_ms": percentile(lat, 0.95),
        "latency_p99_ms": percentile(lat, 0.99),
        "ttft_p50_ms": percentile(ttft, 0.50),
        "ttft_p95_ms": percentile(ttft, 0.95),
        "ttft_p99_ms": percentile(ttft, 0.99),
        "prompt_tokens": acc["prompt_tokens"],
        "completion_tokens": acc["completion_tokens"],
        "total_tokens": acc["total_tokens"],
        "cost_usd": acc["cost_usd"],
    }


def _check_group(group_by: str) -> None:
    if group_by not in GROUPS:
        raise InvalidRequest(
            f"'group_by' must be one of {', '.join(GROUPS)}; got {group_by!r}", param="group_by"
        )


def _select(
    table: Table,
    group_cols: list[Any],
    start: int,
    end: int,
    filters: dict[str, str | None],
    dim: str | None,
) -> Any:
    conds = [table.c.minute_ms >= start, table.c.minute_ms < end]
    if dim is not None:
        conds.append(table.c.dimension == dim)
    for k, v in filters.items():
        if v is not None and k in table.c:
            conds.append(table.c[k] == v)
    # PostgreSQL sums BIGINT into NUMERIC (Decimal in Python): cast back.
    cols = [cast(func.sum(table.c[c]), table.c[c].type).label(c) for c in _SUMS]
    q = select(*group_cols, *cols).where(and_(*conds))
    return q.group_by(*group_cols) if group_cols else q


def summary(
    engine: Engine,
    *,
    window: str = "1h",
    group_by: str = "model",
    model: str | None = None,
    provider: str | None = None,
    now_ms: int | None = None,
) -> dict[str, Any]:
    _check_group(group_by)
    r = window_range(window, now_ms)
    filters = {"model": model, "provider": provider}
    groups: dict[str, dict[str, Any]] = {}
    total = _empty()
    with engine.connect() as conn:
        if group_by in ("feature", "user"):
            if model or provider:
                raise InvalidRequest(
                    "model/provider filters cannot be combined with group_by=feature|user",
                    param="group_by",
                )
            t = rollups_dim_minute
            reads = [
                (conn.execute(_select(t, [t.c.value], r.start_ms, r.end_ms, {}, group_by)), "value")
            ]
        else:
            reads = []
            for table, s, e in _pieces(r, allow_hours=True):
                gcols = [] if group_by == "none" else [table.c[group_by]]
                reads.append(
                    (
                        conn.execute(_select(table, gcols, s, e, filters, None)),
                        None if group_by == "none" else group_by,
                    )
                )
        for result, key in reads:
            for row in result:
                name = "all" if key is None else (row._mapping[key] or "")
                acc = groups.setdefault(name, _empty())
                _accumulate(acc, row)
                _accumulate(total, row)
    data = [{"group": g, **derive(acc, r.seconds)} for g, acc in groups.items() if acc["requests"]]
    data.sort(key=lambda d: -d["requests"])
    return {
        "window": window,
        "group_by": group_by,
        "from": r.start_ms,
        "to": r.end_ms,
        "data": data,
        "total": derive(total, r.seconds),
    }


def timeseries(
    engine: Engine,
    *,
    metric: str,
    window: str = "1h",
    step: str = "1m",
    group_by: str = "none",
    model: str | None = None,
    provider: str | None = None,
    now_ms: int | None = None,
) -> dict[str, Any]:
    if metric not in METRICS:
        raise InvalidRequest(
            f"'metric' must be one of {', '.join(METRICS)}; got {metric!r}", param="metric"
        )
    if step not in STEPS:
        raise InvalidRequest(f"'step' must be one of {', '.join(STEPS)}", param="step")
    _check_group(group_by)
    r = window_range(window, now_ms)
    step_ms = STEPS[step] * MINUTE
    start = r.start_ms // step_ms * step_ms
    buckets = list(range(start, r.end_ms, step_ms))
    if len(buckets) > 5000:
        raise InvalidRequest("too many points: use a larger step for this window", param="step")
    if metric in RESOURCE_METRICS:
        return _resource_series(engine, metric, r, step_ms, buckets, window, step)
    per: dict[str, dict[int, dict[str, Any]]] = {}
    with engine.connect() as conn:
        if group_by in ("feature", "user"):
            t = rollups_dim_minute
            reads = [(t, r.start_ms, r.end_ms, [t.c.value], group_by, "value")]
        else:
            use_hours = step_ms >= HOUR
            reads = [
                (
                    table,
                    s,
                    e,
                    [] if group_by == "none" else [table.c[group_by]],
                    None,
                    None if group_by == "none" else group_by,
                )
                for table, s, e in _pieces(r, allow_hours=use_hours)
            ]
        for table, s, e, gcols, dim, key in reads:
            b = (table.c.minute_ms - (table.c.minute_ms % step_ms)).label("bucket")
            q = _select(table, [*gcols, b], s, e, {"model": model, "provider": provider}, dim)
            for row in conn.execute(q):
                name = "all" if key is None else (row._mapping[key] or "")
                acc = per.setdefault(name, {}).setdefault(row.bucket, _empty())
                _accumulate(acc, row)
    series = []
    for name, by_bucket in sorted(per.items()):
        points = []
        for bk in buckets:
            acc = by_bucket.get(bk)
            if acc is None:
                value = 0 if metric in COUNT_METRICS or metric in ("rps", "error_rate") else None
            else:
                value = derive(acc, step_ms / 1000)[metric]
            points.append([bk, value])
        series.append({"group": name, "points": points})
    return {
        "metric": metric,
        "window": window,
        "step": step,
        "group_by": group_by,
        "series": series,
    }


def _resource_series(
    engine: Engine, metric: str, r: Range, step_ms: int, buckets: list[int], window: str, step: str
) -> dict[str, Any]:
    t = resource_samples
    b = (t.c.ts_ms - (t.c.ts_ms % step_ms)).label("bucket")
    agg = func.max if metric.startswith("recorder_") else func.avg
    q = (
        select(t.c.instance, b, agg(t.c[metric]).label("v"))
        .where(t.c.ts_ms >= r.start_ms, t.c.ts_ms < r.end_ms)
        .group_by(t.c.instance, b)
    )
    per: dict[str, dict[int, float]] = {}
    with engine.connect() as conn:
        for row in conn.execute(q):
            per.setdefault(row.instance, {})[row.bucket] = row.v
    series = [
        {"group": inst, "points": [[bk, vals.get(bk)] for bk in buckets]}
        for inst, vals in sorted(per.items())
    ]
    return {
        "metric": metric,
        "window": window,
        "step": step,
        "group_by": "instance",
        "series": series,
    }
