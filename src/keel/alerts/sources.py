"""The built-in signals: rollup metrics, traffic, component health, resources, retrieval.

Importing this module registers every signal in :data:`keel.alerts.signals.SIGNALS`.

Every family reads its rows with one query per tick and window (shared through
``EvalContext.cache``) and then filters and groups in Python: an evaluator with
hundreds of rules over a handful of windows runs a handful of queries, not
hundreds. Rollup signals read whole hours from ``rollups_hour`` for windows of
two hours or more, as the dashboards do.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Float, and_, cast, func, select, true, union_all
from sqlalchemy.engine import Engine

from keel.alerts.model import Labels
from keel.alerts.signals import SIGNALS, EvalContext, Signal, SignalQuery, register_signal
from keel.store.rollups import percentile
from keel.store.tables import (
    LAT_COLS,
    TTFT_COLS,
    component_checks,
    resource_samples,
    rollups_dim_minute,
    rollups_hour,
    rollups_minute,
    spans,
)

if TYPE_CHECKING:
    from keel.config import RuleSettings

MINUTE = 60_000
HOUR = 3_600_000
DAY = 86_400_000
#: How far back component_down_seconds looks for the last successful check.
DOWN_LOOKBACK_MS = 7 * DAY

_LOCK = threading.Lock()


def _memo(ctx: EvalContext, key: tuple, compute: Callable[[], Any]) -> Any:
    """ctx.cache[key], computed once even when signals run in several threads."""
    try:
        return ctx.cache[key]
    except KeyError:
        pass
    with _LOCK:
        lock = ctx.cache.setdefault(("_lock", key), threading.Lock())
    with lock:
        if key not in ctx.cache:
            ctx.cache[key] = compute()
        return ctx.cache[key]


def _group(items: Iterable[tuple[dict[str, str], Any]], q: SignalQuery) -> dict[Labels, list[Any]]:
    """Keep the items whose labels match the filters, bucketed by the group_by labels."""
    out: dict[Labels, list[Any]] = {}
    keys = sorted(set(q.group_by))
    for labels, item in items:
        if any(labels.get(k) != v for k, v in q.filters):
            continue
        out.setdefault(tuple((k, labels.get(k, "")) for k in keys), []).append(item)
    return out


class _GroupedSignal(Signal):
    """A signal that reduces the matching items of each label set to one value."""

    def items(self, ctx: EvalContext, q: SignalQuery) -> Iterable[tuple[dict[str, str], Any]]:
        raise NotImplementedError

    def reduce(self, items: list[Any], q: SignalQuery) -> float | None:
        raise NotImplementedError

    def values(self, ctx: EvalContext, q: SignalQuery) -> dict[Labels, float | None]:
        return {k: self.reduce(v, q) for k, v in _group(self.items(ctx, q), q).items()}


# -- rollup metrics -------------------------------------------------------------------------

_COLS = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "latency_sum_ms",
    "cost_usd",
    *LAT_COLS,
    *TTFT_COLS,
)
_REQ, _ERR, _PT, _CT, _TT, _LATSUM, _COST = range(7)
_LAT = slice(7, 7 + len(LAT_COLS))
_TTFT = slice(_LAT.stop, _LAT.stop + len(TTFT_COLS))
_MAIN_LABELS = ("model", "provider", "endpoint")
_DIMS = ("feature", "user")


def rollup_range(q: SignalQuery) -> tuple[int, int]:
    """The whole minutes a rollup signal reads: the window's minutes up to and including
    the current, partial one (as the dashboards' windows do)."""
    end = int(q.end_ms) // MINUTE * MINUTE + MINUTE
    minutes = max(1, math.ceil(q.window_ms / MINUTE))
    return end - minutes * MINUTE, end


def _pieces(start: int, end: int) -> list[tuple[Any, int, int]]:
    h0 = -(-start // HOUR) * HOUR
    h1 = end // HOUR * HOUR
    if h1 - h0 < 2 * HOUR:
        return [(rollups_minute, start, end)]
    out = [(rollups_hour, h0, h1)]
    if start < h0:
        out.append((rollups_minute, start, h0))
    if h1 < end:
        out.append((rollups_minute, h1, end))
    return out


def _sums(t: Any) -> list[Any]:
    # PostgreSQL sums BIGINT into NUMERIC (Decimal in Python): cast back.
    return [cast(func.sum(t.c[c]), t.c[c].type).label(c) for c in _COLS]


def _query_rollups(
    engine: Engine, dim: str | None, start: int, end: int
) -> list[tuple[dict[str, str], list[float]]]:
    """Sums per (model, provider, endpoint), or per value of a dimension, in one statement."""
    if dim is not None:
        t = rollups_dim_minute
        stmt: Any = (
            select(t.c.value, *_sums(t))
            .where(t.c.dimension == dim, t.c.minute_ms >= start, t.c.minute_ms < end)
            .group_by(t.c.value)
        )
    else:
        parts = [
            select(t.c.model, t.c.provider, t.c.endpoint, *_sums(t))
            .where(t.c.minute_ms >= s, t.c.minute_ms < e)
            .group_by(t.c.model, t.c.provider, t.c.endpoint)
            for t, s, e in _pieces(start, end)
        ]
        stmt = parts[0] if len(parts) == 1 else union_all(*parts)
    n = 1 if dim is not None else 3
    acc: dict[tuple, list[float]] = {}
    with engine.connect() as conn:
        for row in conn.execute(stmt):
            key = tuple(row[:n])
            vals = [v or 0 for v in row[n:]]
            a = acc.get(key)
            if a is None:
                acc[key] = vals
            else:
                acc[key] = [x + y for x, y in zip(a, vals, strict=True)]
    names = (dim,) if dim is not None else _MAIN_LABELS
    return [
        ({k: v or "" for k, v in zip(names, key, strict=True)}, vals) for key, vals in acc.items()
    ]


def _dimension(filters: Iterable[str], group_by: Iterable[str]) -> str | None:
    gb = set(group_by)
    used = set(filters) | gb
    dims = sorted(used & set(_DIMS))
    if not dims:
        return None
    if len(dims) > 1 or used & set(_MAIN_LABELS):
        where = "group_by" if gb & set(_DIMS) else "filters"
        other = sorted(used - {dims[0]})
        raise ValueError(
            f"{where}: '{dims[0]}' comes from separate rollups and cannot be combined with "
            f"{', '.join(map(repr, other))} in filters or group_by"
        )
    return dims[0]


def rollup_groups(ctx: EvalContext, q: SignalQuery) -> dict[Labels, list[float]]:
    """Summed rollup columns per label set (ungrouped: always one, possibly all zeros)."""
    dim = _dimension((k for k, _ in q.filters), q.group_by)
    start, end = rollup_range(q)
    filters = tuple(sorted(q.filters))
    group_by = tuple(sorted(set(q.group_by)))

    def agg() -> dict[Labels, list[float]]:
        rows = _memo(
            ctx, ("rollups", dim, start, end), lambda: _query_rollups(ctx.engine, dim, start, end)
        )
        out: dict[Labels, list[float]] = {}
        for key, items in _group(
            rows, SignalQuery(q.window_ms, q.end_ms, filters, group_by)
        ).items():
            acc = list(items[0])
            for vals in items[1:]:
                acc = [x + y for x, y in zip(acc, vals, strict=True)]
            out[key] = acc
        if not group_by and () not in out:
            out[()] = [0] * len(_COLS)
        return out

    return _memo(ctx, ("rollup-groups", dim, start, end, filters, group_by), agg)


class _RollupSignal(Signal):
    labels = (*_MAIN_LABELS, *_DIMS)

    def metric(self, acc: list[float], seconds: float) -> float | None:
        raise NotImplementedError

    def check(self, filters: dict[str, str], group_by: list[str]) -> None:
        super().check(filters, group_by)
        _dimension(filters, group_by)

    def values(self, ctx: EvalContext, q: SignalQuery) -> dict[Labels, float | None]:
        start, _ = rollup_range(q)
        # Rates divide by the time the minutes read can hold so far, not by whole
        # minutes: at 12:00:10 the current minute holds 10 s of traffic.
        seconds = max(q.end_ms - start, 1) / 1000
        return {k: self.metric(acc, seconds) for k, acc in rollup_groups(ctx, q).items()}


class _Count(_RollupSignal):
    unit = "count"
    column = _REQ

    def metric(self, acc: list[float], seconds: float) -> float | None:
        return float(acc[self.column])


class _PerRequest(_RollupSignal):
    column = _ERR

    def metric(self, acc: list[float], seconds: float) -> float | None:
        return acc[self.column] / acc[_REQ] if acc[_REQ] else None


class _Percentile(_RollupSignal):
    unit = "ms"
    columns = _LAT
    p = 0.5

    def metric(self, acc: list[float], seconds: float) -> float | None:
        return percentile(acc[self.columns], self.p)


class _Rate(_RollupSignal):
    column = _REQ
    per_s = 1.0  # 60: per minute, 3600: per hour

    def metric(self, acc: list[float], seconds: float) -> float | None:
        return acc[self.column] * self.per_s / seconds


@register_signal
class Requests(_Count):
    name, description, column = "requests", "Requests in the window.", _REQ


@register_signal
class Rps(_Rate):
    name, description, unit = "rps", "Requests per second over the window.", "per_s"


@register_signal
class Errors(_Count):
    name, description, column = "errors", "Failed requests in the window.", _ERR


@register_signal
class ErrorRate(_PerRequest):
    name, description, unit = "error_rate", "Share of requests that failed (0-1).", "ratio"


@register_signal
class LatencyMean(_PerRequest):
    name, description, unit, column = "latency_mean_ms", "Mean request latency.", "ms", _LATSUM


@register_signal
class LatencyP50(_Percentile):
    name, description, p = "latency_p50_ms", "Median request latency.", 0.50


@register_signal
class LatencyP95(_Percentile):
    name, description, p = "latency_p95_ms", "p95 request latency.", 0.95


@register_signal
class LatencyP99(_Percentile):
    name, description, p = "latency_p99_ms", "p99 request latency.", 0.99


@register_signal
class TtftP50(_Percentile):
    name, description = "ttft_p50_ms", "Median time to first token (streams)."
    columns, p = _TTFT, 0.50


@register_signal
class TtftP95(_Percentile):
    name, description = "ttft_p95_ms", "p95 time to first token (streams)."
    columns, p = _TTFT, 0.95


@register_signal
class TtftP99(_Percentile):
    name, description = "ttft_p99_ms", "p99 time to first token (streams)."
    columns, p = _TTFT, 0.99


@register_signal
class PromptTokens(_Count):
    name, description, column = "prompt_tokens", "Prompt tokens in the window.", _PT


@register_signal
class CompletionTokens(_Count):
    name, description, column = "completion_tokens", "Completion tokens in the window.", _CT


@register_signal
class TotalTokens(_Count):
    name, description, column = "total_tokens", "Prompt + completion tokens in the window.", _TT


@register_signal
class TokensPerMinute(_Rate):
    name, description = "tokens_per_minute", "Tokens per minute over the window."
    unit, column, per_s = "per_min", _TT, 60.0


@register_signal
class CostUsd(_Count):
    name, description = "cost_usd", "Spend in the window."
    unit, column = "usd", _COST


@register_signal
class CostPerHour(_Rate):
    name, description = "cost_per_hour_usd", "Spend rate over the window, per hour."
    unit, column, per_s = "usd", _COST, 3600.0


@register_signal
class NoTraffic(Signal):
    name = "no_traffic"
    description = "1 when the window had no requests but the same window a day earlier had some."
    unit = "count"
    labels = _MAIN_LABELS

    def values(self, ctx: EvalContext, q: SignalQuery) -> dict[Labels, float | None]:
        now = rollup_groups(ctx, q)
        before = rollup_groups(ctx, SignalQuery(q.window_ms, q.end_ms - DAY, q.filters, q.group_by))
        out: dict[Labels, float | None] = {}
        for key in now.keys() | before.keys():
            n_now = now[key][_REQ] if key in now else 0
            n_before = before[key][_REQ] if key in before else 0
            if n_now or n_before:
                out[key] = 1.0 if n_now == 0 else 0.0
        return out


# -- component health -----------------------------------------------------------------------


def _latest_checks(ctx: EvalContext, q: SignalQuery) -> list[tuple[dict[str, str], tuple]]:
    """Per component checked in the window: (labels, (up, last_ts, latency_sum, latency_n))."""
    start = q.end_ms - q.window_ms
    t = component_checks

    def run() -> list[tuple[dict[str, str], tuple]]:
        w = (
            select(
                t.c.component,
                func.max(t.c.ts_ms).label("last_ts"),
                cast(func.sum(t.c.latency_ms), Float).label("lat_sum"),
                func.count(t.c.latency_ms).label("lat_n"),
            )
            .where(t.c.ts_ms >= start, t.c.ts_ms < q.end_ms)
            .group_by(t.c.component)
            .subquery()
        )
        stmt = select(t.c.component, t.c.kind, t.c.up, w.c.last_ts, w.c.lat_sum, w.c.lat_n).join(
            w, and_(t.c.component == w.c.component, t.c.ts_ms == w.c.last_ts)
        )
        with ctx.engine.connect() as conn:
            return [
                (
                    {"component": r.component, "kind": r.kind},
                    (bool(r.up), r.last_ts, r.lat_sum, r.lat_n),
                )
                for r in conn.execute(stmt)
            ]

    return _memo(ctx, ("checks", start, q.end_ms), run)


def _down_since(ctx: EvalContext, component: str, end_ms: int) -> int | None:
    """When a component that is down now was last up (or first seen down, within the lookback)."""
    t = component_checks

    def run() -> int | None:
        span = and_(
            t.c.component == component,
            t.c.ts_ms >= end_ms - DOWN_LOOKBACK_MS,
            t.c.ts_ms < end_ms,
        )
        with ctx.engine.connect() as conn:
            # Walks the (component, ts_ms) index backwards to the last good check.
            last_up = conn.execute(
                select(t.c.ts_ms).where(span, t.c.up == true()).order_by(t.c.ts_ms.desc()).limit(1)
            ).scalar()
            if last_up is not None:
                return int(last_up)
            first = conn.execute(select(func.min(t.c.ts_ms)).where(span)).scalar()
            return int(first) if first is not None else None

    return _memo(ctx, ("down-since", component, end_ms), run)


class _ComponentSignal(_GroupedSignal):
    labels = ("component", "kind")

    def items(self, ctx: EvalContext, q: SignalQuery) -> Iterable[tuple[dict[str, str], Any]]:
        return _latest_checks(ctx, q)


@register_signal
class ComponentUp(_ComponentSignal):
    name = "component_up"
    description = "1 when the component's latest check in the window succeeded, else 0."
    unit = "count"

    def reduce(self, items: list[Any], q: SignalQuery) -> float | None:
        return 1.0 if all(up for up, *_ in items) else 0.0


@register_signal
class ComponentDownSeconds(_ComponentSignal):
    name = "component_down_seconds"
    description = "Seconds since the component last answered, while its latest check fails."
    unit = "seconds"

    def items(self, ctx: EvalContext, q: SignalQuery) -> Iterable[tuple[dict[str, str], Any]]:
        out = []
        for labels, (up, *_) in _latest_checks(ctx, q):
            if up:
                out.append((labels, 0.0))
                continue
            since = _down_since(ctx, labels["component"], q.end_ms)
            out.append((labels, (q.end_ms - since) / 1000 if since is not None else None))
        return out

    def reduce(self, items: list[Any], q: SignalQuery) -> float | None:
        known = [v for v in items if v is not None]
        return max(known) if known else None


@register_signal
class ProbeLatency(_ComponentSignal):
    name = "probe_latency_ms"
    description = "Mean latency of the component's health checks in the window."
    unit = "ms"

    def reduce(self, items: list[Any], q: SignalQuery) -> float | None:
        n = sum(i[3] for i in items)
        return sum(i[2] or 0.0 for i in items) / n if n else None


# -- resources (per instance) ---------------------------------------------------------------

_MEANS = {
    "process_cpu_percent": resource_samples.c.process_cpu_percent,
    "host_cpu_percent": resource_samples.c.host_cpu_percent,
    "process_rss_bytes": resource_samples.c.process_rss_bytes,
    "host_mem_used_percent": resource_samples.c.host_mem_used_bytes
    * 100.0
    / func.nullif(resource_samples.c.host_mem_total_bytes, 0),
    "loop_lag_ms": resource_samples.c.loop_lag_ms,
}


def _resource_means(ctx: EvalContext, q: SignalQuery) -> list[tuple[dict[str, str], dict]]:
    start = q.end_ms - q.window_ms
    t = resource_samples

    def run() -> list[tuple[dict[str, str], dict]]:
        cols = []
        for name, expr in _MEANS.items():
            cols += [cast(func.sum(expr), Float).label(name), func.count(expr).label(f"{name}_n")]
        stmt = (
            select(t.c.instance, *cols, func.max(t.c.recorder_queue_depth).label("queue"))
            .where(t.c.ts_ms >= start, t.c.ts_ms < q.end_ms)
            .group_by(t.c.instance)
        )
        with ctx.engine.connect() as conn:
            return [({"instance": r.instance}, dict(r._mapping)) for r in conn.execute(stmt)]

    return _memo(ctx, ("resources", start, q.end_ms), run)


class _ResourceMean(_GroupedSignal):
    labels = ("instance",)

    def items(self, ctx: EvalContext, q: SignalQuery) -> Iterable[tuple[dict[str, str], Any]]:
        return _resource_means(ctx, q)

    def reduce(self, items: list[Any], q: SignalQuery) -> float | None:
        n = sum(r[f"{self.name}_n"] for r in items)
        return sum(r[self.name] or 0.0 for r in items) / n if n else None


@register_signal
class ProcessCpu(_ResourceMean):
    name, description = "process_cpu_percent", "Mean CPU of the Keel process (100 = one core)."
    unit = "percent"


@register_signal
class HostCpu(_ResourceMean):
    name, description = "host_cpu_percent", "Mean CPU of the host, all cores (0-100)."
    unit = "percent"


@register_signal
class ProcessRss(_ResourceMean):
    name, description = "process_rss_bytes", "Mean resident memory of the Keel process."
    unit = "bytes"


@register_signal
class HostMemUsed(_ResourceMean):
    name, description = "host_mem_used_percent", "Mean share of host memory in use (0-100)."
    unit = "percent"


@register_signal
class LoopLag(_ResourceMean):
    name, description = "loop_lag_ms", "Mean event-loop lag: how late the server ran a timer."
    unit = "ms"


@register_signal
class RecorderQueueDepth(_ResourceMean):
    name = "recorder_queue_depth"
    description = "Largest recorder queue depth sampled in the window."
    unit = "count"

    def reduce(self, items: list[Any], q: SignalQuery) -> float | None:
        vals = [r["queue"] for r in items if r["queue"] is not None]
        return float(max(vals)) if vals else None


def _counter_series(ctx: EvalContext, q: SignalQuery) -> dict[str, list[tuple]]:
    start = q.end_ms - q.window_ms
    t = resource_samples

    def run() -> dict[str, list[tuple]]:
        stmt = (
            select(t.c.instance, t.c.recorder_spilled, t.c.recorder_dropped)
            .where(t.c.ts_ms >= start, t.c.ts_ms < q.end_ms)
            .order_by(t.c.instance, t.c.ts_ms)
        )
        out: dict[str, list[tuple]] = {}
        with ctx.engine.connect() as conn:
            for r in conn.execute(stmt):
                out.setdefault(r.instance, []).append((r.recorder_spilled, r.recorder_dropped))
        return out

    return _memo(ctx, ("counters", start, q.end_ms), run)


def increase(values: Iterable[float | None]) -> float | None:
    """Growth of a cumulative counter; a decrease is a restart, so the new value counts."""
    total, prev = None, None
    for v in values:
        if v is None:
            continue
        if prev is not None:
            total = (total or 0.0) + (v - prev if v >= prev else v)
        else:
            total = 0.0
        prev = v
    return total


class _RecorderCounter(_GroupedSignal):
    labels = ("instance",)
    column = 0

    def items(self, ctx: EvalContext, q: SignalQuery) -> Iterable[tuple[dict[str, str], Any]]:
        return [
            ({"instance": inst}, increase(r[self.column] for r in rows))
            for inst, rows in _counter_series(ctx, q).items()
        ]

    def reduce(self, items: list[Any], q: SignalQuery) -> float | None:
        known = [v for v in items if v is not None]
        return float(sum(known)) if known else None


@register_signal
class RecorderSpilled(_RecorderCounter):
    name = "recorder_spilled"
    description = "Traces spilled to disk in the window (the store was down or the queue full)."
    unit = "count"
    column = 0


@register_signal
class RecorderDropped(_RecorderCounter):
    name = "recorder_dropped"
    description = "Traces lost in the window (not even the spill file could take them)."
    unit = "count"
    column = 1


def _gpu_means(ctx: EvalContext, q: SignalQuery) -> list[tuple[dict[str, str], tuple]]:
    """(labels, (util_sum, mem_pct_sum, n)) per instance and GPU index."""
    start = q.end_ms - q.window_ms
    t = resource_samples

    def run() -> list[tuple[dict[str, str], tuple]]:
        stmt = select(t.c.instance, t.c.gpu).where(
            t.c.ts_ms >= start, t.c.ts_ms < q.end_ms, t.c.gpu.is_not(None)
        )
        acc: dict[tuple[str, str], list[float]] = {}
        with ctx.engine.connect() as conn:
            for r in conn.execute(stmt):
                try:
                    gpus = orjson.loads(r.gpu) or []
                except orjson.JSONDecodeError:
                    continue
                for g in gpus:
                    a = acc.setdefault((r.instance, str(g.get("index", ""))), [0.0, 0.0, 0, 0])
                    if g.get("utilization_percent") is not None:
                        a[0] += g["utilization_percent"]
                        a[2] += 1
                    if g.get("memory_total_bytes"):
                        a[1] += g.get("memory_used_bytes", 0) * 100 / g["memory_total_bytes"]
                        a[3] += 1
        return [({"instance": i, "gpu": g}, tuple(a)) for (i, g), a in acc.items()]

    return _memo(ctx, ("gpu", start, q.end_ms), run)


class _GpuMean(_GroupedSignal):
    labels = ("instance", "gpu")
    field = 0

    def items(self, ctx: EvalContext, q: SignalQuery) -> Iterable[tuple[dict[str, str], Any]]:
        return _gpu_means(ctx, q)

    def reduce(self, items: list[Any], q: SignalQuery) -> float | None:
        n = sum(a[self.field + 2] for a in items)
        return sum(a[self.field] for a in items) / n if n else None


@register_signal
class GpuUtilization(_GpuMean):
    name = "gpu_utilization_percent"
    description = "Mean GPU utilisation (0-100); no data without a GPU."
    unit = "percent"
    field = 0


@register_signal
class GpuMemoryUsed(_GpuMean):
    name = "gpu_memory_used_percent"
    description = "Mean share of GPU memory in use (0-100); no data without a GPU."
    unit = "percent"
    field = 1


# -- retrieval (spans) ----------------------------------------------------------------------


def _retrieval_spans(ctx: EvalContext, q: SignalQuery) -> list[tuple[dict[str, str], tuple]]:
    start = q.end_ms - q.window_ms
    t = spans

    def run() -> list[tuple[dict[str, str], tuple]]:
        stmt = select(t.c.kind, t.c.service, t.c.duration_ms, t.c.result_count).where(
            t.c.kind.in_(("retrieval", "vector-db")),
            t.c.start_us >= start * 1000,
            t.c.start_us < q.end_ms * 1000,
        )
        with ctx.engine.connect() as conn:
            return [
                ({"kind": r.kind, "service": r.service or ""}, (r.duration_ms, r.result_count))
                for r in conn.execute(stmt)
            ]

    return _memo(ctx, ("retrieval", start, q.end_ms), run)


def quantile(values: list[float], p: float) -> float | None:
    """Linear-interpolated quantile (0..1) of raw values."""
    if not values:
        return None
    xs = sorted(values)
    pos = p * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class _RetrievalSignal(_GroupedSignal):
    labels = ("kind", "service")

    def items(self, ctx: EvalContext, q: SignalQuery) -> Iterable[tuple[dict[str, str], Any]]:
        return _retrieval_spans(ctx, q)


@register_signal
class RetrievalEmptyRate(_RetrievalSignal):
    name = "retrieval_empty_rate"
    description = "Share of retrievals that returned nothing (of those reporting a count)."
    unit = "ratio"

    def reduce(self, items: list[Any], q: SignalQuery) -> float | None:
        counts = [c for _, c in items if c is not None]
        return sum(1 for c in counts if c == 0) / len(counts) if counts else None


@register_signal
class RetrievalP95(_RetrievalSignal):
    name = "retrieval_p95_ms"
    description = "p95 duration of retrieval and vector-database spans."
    unit = "ms"

    def reduce(self, items: list[Any], q: SignalQuery) -> float | None:
        return quantile([d for d, _ in items], 0.95)


# -- catalogue and rule validation ----------------------------------------------------------


def describe_signals() -> list[dict[str, Any]]:
    """Every registered signal, for `keel alerts signals` and the API."""
    return [
        {"name": s.name, "description": s.description, "unit": s.unit, "labels": list(s.labels)}
        for s in SIGNALS.values()
    ]


def validate_rule(rule: RuleSettings) -> None:
    """Raise ValueError (naming the field) when a rule names an unknown signal or label."""
    sig = SIGNALS.get(rule.signal)
    if sig is None:
        raise ValueError(
            f"signal: unknown signal {rule.signal!r} (known: {', '.join(sorted(SIGNALS))})"
        )
    dupes = sorted({k for k in rule.group_by if rule.group_by.count(k) > 1})
    if dupes:
        raise ValueError(f"group_by: label(s) listed twice: {', '.join(dupes)}")
    sig.check(dict(rule.filters), list(rule.group_by))


__all__ = ["describe_signals", "increase", "quantile", "rollup_range", "validate_rule"]
