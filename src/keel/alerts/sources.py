"""The built-in signals: rollup metrics, plus the catalogue and rule validation.

Importing this module registers every signal in :data:`keel.alerts.signals.SIGNALS`:
the rollup-metric signals here, and (through the import at the end) the traffic,
component-health, resource, GPU and retrieval signals of :mod:`keel.alerts.sources_system`.

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

from sqlalchemy import cast, func, select, union_all
from sqlalchemy.engine import Engine

from keel.alerts.model import Labels
from keel.alerts.signals import SIGNALS, EvalContext, Signal, SignalQuery, register_signal
from keel.store.rollups import percentile
from keel.store.tables import (
    LAT_COLS,
    TTFT_COLS,
    rollups_dim_minute,
    rollups_hour,
    rollups_minute,
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


# Shared by both modules of signals: generic statistics over raw values.


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


def quantile(values: list[float], p: float) -> float | None:
    """Linear-interpolated quantile (0..1) of raw values."""
    if not values:
        return None
    xs = sorted(values)
    pos = p * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


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

# Registers the other built-in signals; last, as that module builds on this one.
import keel.alerts.sources_system  # noqa: E402, F401
