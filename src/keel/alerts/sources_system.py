"""The built-in signals beyond rollup metrics: traffic, component health, resources
(recorder, GPU), retrieval.

Importing :mod:`keel.alerts.sources` registers them (it imports this module); the
shared helpers (``_memo``, ``_group``, ``rollup_groups``) live there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from sqlalchemy import Float, and_, cast, func, select, true

from keel.alerts.model import Labels
from keel.alerts.signals import EvalContext, Signal, SignalQuery, register_signal
from keel.alerts.sources import (
    _MAIN_LABELS,
    _REQ,
    DAY,
    DOWN_LOOKBACK_MS,
    _group,
    _memo,
    increase,
    quantile,
    rollup_groups,
)
from keel.store.tables import component_checks, resource_samples, spans


class _GroupedSignal(Signal):
    """A signal that reduces the matching items of each label set to one value."""

    def items(self, ctx: EvalContext, q: SignalQuery) -> Iterable[tuple[dict[str, str], Any]]:
        raise NotImplementedError

    def reduce(self, items: list[Any], q: SignalQuery) -> float | None:
        raise NotImplementedError

    def values(self, ctx: EvalContext, q: SignalQuery) -> dict[Labels, float | None]:
        return {k: self.reduce(v, q) for k, v in _group(self.items(ctx, q), q).items()}


# -- traffic --------------------------------------------------------------------------------


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
