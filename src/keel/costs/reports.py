"""Cost reports: spend by group with a monthly projection, cost against input length,
and a side-by-side comparison of models.

Spend and comparisons read the rollups (whole hours from ``rollups_hour``, the
ragged edges from ``rollups_minute``; keys, users and features from
``rollups_dim_minute``). Only two figures need raw traces, each from a bounded
scan of the most recent ones: how many calls had no known price, and the
per-call points of the cost-against-input-length fit. A call with an unknown
cost adds 0 to the rollups' sums; ``unknown_cost_requests`` says how many.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, and_, cast, func, or_, select
from sqlalchemy.engine import Connection, Engine

from keel.errors import InvalidRequest
from keel.store.rollups import percentile
from keel.store.tables import LAT_COLS, rollups_dim_minute, rollups_hour, rollups_minute, traces

MINUTE = 60_000
HOUR = 3_600_000
DAY = 86_400_000
GROUPS = ("model", "provider", "key", "user", "feature", "day")
DIM_GROUPS = {"key": "key", "user": "user", "feature": "feature"}
TRACE_GROUP_COLS = {
    "model": "model",
    "provider": "provider",
    "key": "api_key_id",
    "user": "user_id",
    "feature": "feature",
}
NONE_GROUP = "(none)"
PROJECTION_DAYS = 7
UNKNOWN_SCAN_LIMIT = 100_000
LENGTH_SCAN_LIMIT = 100_000
COMPARE_NOTE = (
    "Live traffic of each model over the same period. Comparing models on the same "
    "dataset comes with evaluations (dataset runs), not yet available."
)
_SUMS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_usd", "latency_sum_ms")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def _pieces(start: int, end: int) -> list[tuple[Table, int, int]]:
    """(table, start, end) reads covering [start, end): whole hours from the hourly table."""
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


def _sum_cols(table: Table, cols: tuple[str, ...]) -> list[Any]:
    # PostgreSQL sums BIGINT into NUMERIC (Decimal in Python): cast back.
    return [cast(func.sum(table.c[c]), table.c[c].type).label(c) for c in cols]


def _empty(cols: tuple[str, ...]) -> dict[str, Any]:
    return dict.fromkeys(cols, 0)


def _group_expr(table: Table, group_by: str) -> Any:
    if group_by == "day":
        return (table.c.minute_ms - table.c.minute_ms % DAY).label("g")
    if group_by in DIM_GROUPS:
        return table.c.value.label("g")
    if group_by == "none":
        return None
    return table.c[group_by].label("g")


def _label(group_by: str, value: Any) -> str:
    if group_by == "day":
        return datetime.fromtimestamp(int(value) / 1000, UTC).strftime("%Y-%m-%d")
    return str(value) if value not in (None, "") else NONE_GROUP


def rollup_sums(
    conn: Connection,
    start: int,
    end: int,
    group_by: str,
    *,
    cols: tuple[str, ...] = _SUMS,
    models: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Sums of ``cols`` over [start, end) by group (``none``: one group, ``all``)."""
    out: dict[str, dict[str, Any]] = {}
    if group_by in DIM_GROUPS:
        t = rollups_dim_minute
        reads = [(t, start, end, [t.c.dimension == DIM_GROUPS[group_by]])]
    else:
        reads = [(t, s, e, []) for t, s, e in _pieces(start, end)]
    for table, s, e, extra in reads:
        conds = [table.c.minute_ms >= s, table.c.minute_ms < e, *extra]
        if models is not None:
            conds.append(table.c.model.in_(models))
        g = _group_expr(table, group_by)
        q = select(*([g] if g is not None else []), *_sum_cols(table, cols)).where(and_(*conds))
        if g is not None:
            q = q.group_by(g)
        for row in conn.execute(q):
            m = row._mapping
            name = "all" if g is None else _label(group_by, m["g"])
            acc = out.setdefault(name, _empty(cols))
            for c in cols:
                acc[c] += m[c] or 0
    return out


def unknown_cost_counts(
    conn: Connection,
    start: int,
    end: int,
    group_by: str,
    *,
    models: list[str] | None = None,
    limit: int = UNKNOWN_SCAN_LIMIT,
) -> tuple[dict[str, int], int]:
    """Calls with tokens but no known cost, by group, among the ``limit`` most recent
    traces of the window. Returns (counts, traces scanned)."""
    t = traces
    conds = [t.c.started_at_ms >= start, t.c.started_at_ms < end]
    if models is not None:
        conds.append(t.c.model.in_(models))
    if group_by == "day":
        g = (t.c.started_at_ms - t.c.started_at_ms % DAY).label("g")
    elif group_by == "none":
        g = None
    else:
        g = t.c[TRACE_GROUP_COLS[group_by]].label("g")
    inner_cols = [t.c.cost_usd, t.c.prompt_tokens, t.c.completion_tokens]
    if g is not None:
        inner_cols.append(g)
    sub = (
        select(*inner_cols)
        .where(and_(*conds))
        .order_by(t.c.started_at_ms.desc())
        .limit(limit)
        .subquery()
    )
    scanned = conn.execute(select(func.count()).select_from(sub)).scalar_one()
    unknown = and_(
        sub.c.cost_usd.is_(None), or_(sub.c.prompt_tokens > 0, sub.c.completion_tokens > 0)
    )
    counts: dict[str, int] = {}
    if g is None:
        n = conn.execute(select(func.count()).select_from(sub).where(unknown)).scalar_one()
        if n:
            counts["all"] = int(n)
    else:
        q = select(sub.c.g, func.count().label("n")).where(unknown).group_by(sub.c.g)
        for row in conn.execute(q):
            counts[_label(group_by, row.g)] = int(row.n)
    return counts, int(scanned)


def _per_1k(cost: float, n: int) -> float | None:
    return cost / n * 1000 if n else None


def check_range(start: int | None, end: int | None, *, default_days: int) -> tuple[int, int]:
    """Defaults (the last ``default_days`` up to now) and sanity checks of a window.

    Rollups resolve minutes, so the window is widened to whole minutes (raw-trace
    reads use the same bounds, so every figure covers the same calls).
    """
    now = now_ms()
    end = end if end is not None else now
    start = start if start is not None else end - default_days * DAY
    start = start // MINUTE * MINUTE
    end = -(-end // MINUTE) * MINUTE
    if start >= end:
        raise InvalidRequest(
            f"the window is empty: from ({iso(start)}) must be before to ({iso(end)})",
            param="from",
        )
    return start, end


def cost_report(
    engine: Engine, *, group_by: str, start_ms: int, end_ms: int, now: int | None = None
) -> dict[str, Any]:
    """Spend by group over [start_ms, end_ms), with a projection of monthly spend."""
    if group_by not in GROUPS:
        raise InvalidRequest(
            f"'group_by' must be one of {', '.join(GROUPS)}; got {group_by!r}", param="group_by"
        )
    now = now if now is not None else now_ms()
    base_end = now // MINUTE * MINUTE + MINUTE  # include the current minute
    base_start = base_end - PROJECTION_DAYS * DAY
    with engine.connect() as conn:
        groups = rollup_sums(conn, start_ms, end_ms, group_by)
        total = rollup_sums(conn, start_ms, end_ms, "none").get("all", _empty(_SUMS))
        if group_by in DIM_GROUPS:
            # Calls without a key/user/feature are not in the dimension rollups.
            rest = {c: total[c] - sum(g[c] for g in groups.values()) for c in _SUMS}
            if rest["requests"] > 0:
                groups[NONE_GROUP] = rest
        unknown, scanned = unknown_cost_counts(conn, start_ms, end_ms, group_by)
        unknown_total = sum(unknown.values())
        proj_groups: dict[str, dict[str, Any]] = {}
        if group_by != "day":
            proj_groups = rollup_sums(conn, base_start, base_end, group_by)
        base_total = rollup_sums(conn, base_start, base_end, "none").get("all", _empty(_SUMS))
        first = conn.execute(
            select(func.min(rollups_hour.c.minute_ms)).where(
                rollups_hour.c.minute_ms >= base_start - HOUR, rollups_hour.c.requests > 0
            )
        ).scalar_one_or_none()
    factor = 30 / PROJECTION_DAYS
    total_cost = float(total["cost_usd"])
    if group_by in DIM_GROUPS:
        rest_cost = float(base_total["cost_usd"]) - sum(
            float(g["cost_usd"]) for g in proj_groups.values()
        )
        proj_groups[NONE_GROUP] = {"cost_usd": rest_cost}
    data = []
    for name, acc in groups.items():
        n, cost = int(acc["requests"]), float(acc["cost_usd"])
        if n == 0 and cost == 0:
            continue
        pg = proj_groups.get(name)
        data.append(
            {
                "group": name,
                "requests": n,
                "errors": int(acc["errors"]),
                "prompt_tokens": int(acc["prompt_tokens"]),
                "completion_tokens": int(acc["completion_tokens"]),
                "cost_usd": cost,
                "cost_per_1k_requests": _per_1k(cost, n),
                "share": cost / total_cost if total_cost > 0 else None,
                "unknown_cost_requests": unknown.get(name, 0),
                "projected_monthly_usd": float(pg["cost_usd"]) * factor
                if pg is not None
                else (0.0 if group_by != "day" else None),
            }
        )
    if group_by == "day":
        data.sort(key=lambda d: d["group"])
    else:
        data.sort(key=lambda d: (-d["cost_usd"], -d["requests"], d["group"]))
    base_cost = float(base_total["cost_usd"])
    observed_days = None
    note = None
    if first is not None:
        observed_days = min(PROJECTION_DAYS, max(0.0, (base_end - max(first, base_start)) / DAY))
        if observed_days < PROJECTION_DAYS - 1 / 24:
            note = (
                f"only {observed_days:.1f} of the {PROJECTION_DAYS} base days have traffic; "
                "the projection assumes none on the others and may be low"
            )
    n_total = int(total["requests"])
    return {
        "group_by": group_by,
        "from_ms": start_ms,
        "to_ms": end_ms,
        "from": iso(start_ms),
        "to": iso(end_ms),
        "data": data,
        "total": {
            "requests": n_total,
            "errors": int(total["errors"]),
            "prompt_tokens": int(total["prompt_tokens"]),
            "completion_tokens": int(total["completion_tokens"]),
            "cost_usd": total_cost,
            "cost_per_1k_requests": _per_1k(total_cost, n_total),
            "unknown_cost_requests": unknown_total,
        },
        "unknown_cost_scanned": scanned,
        "unknown_cost_complete": scanned < UNKNOWN_SCAN_LIMIT,
        "projection": {
            "method": f"spend of the last {PROJECTION_DAYS} days × 30/{PROJECTION_DAYS}",
            "base_from_ms": base_start,
            "base_to_ms": base_end,
            "base_days": PROJECTION_DAYS,
            "base_cost_usd": base_cost,
            "observed_days": observed_days,
            "projected_monthly_usd": base_cost * factor,
            "note": note,
        },
    }


# -- cost against input length -------------------------------------------------


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float] | None:
    """Least squares y ≈ a + b·x with r²; None with fewer than 3 points or one x value."""
    n = len(xs)
    if n < 3:
        return None
    mx = sum(xs) / n
    my = sum(ys) / n
    sxx = sxy = syy = 0.0
    for x, y in zip(xs, ys, strict=True):
        dx, dy = x - mx, y - my
        sxx += dx * dx
        sxy += dx * dy
        syy += dy * dy
    if sxx == 0:
        return None
    b = sxy / sxx
    a = my - b * mx
    ss_res = max(0.0, syy - b * sxy)
    r2 = 1.0 - ss_res / syy if syy > 0 else 1.0
    return {"intercept": a, "slope": b, "r2": r2, "n": n}


def _bucket_bounds(xs_sorted: list[int], n: int, scale: str) -> list[int]:
    """Start index of each bucket in ``xs_sorted`` (equal values stay together)."""
    total = len(xs_sorted)
    if scale == "quantile":
        starts = [0]
        for k in range(1, n):
            i = max(k * total // n, starts[-1] + 1)
            while i < total and xs_sorted[i] == xs_sorted[i - 1]:
                i += 1
            if i >= total:
                break
            starts.append(i)
        return starts
    lo, hi = xs_sorted[0], xs_sorted[-1]
    if lo == hi:
        return [0]
    # Log-spaced edges between the shortest and the longest prompt.
    edges = [lo * (hi / lo) ** (k / n) for k in range(1, n)]
    starts = [0]
    for e in edges:
        i = bisect_right(xs_sorted, e)
        if starts[-1] < i < total:
            starts.append(i)
    return starts


def by_input_length(
    engine: Engine,
    *,
    model: str | None,
    start_ms: int,
    end_ms: int,
    buckets: int = 10,
    scale: str = "log",
    limit: int = LENGTH_SCAN_LIMIT,
) -> dict[str, Any]:
    """Buckets of prompt length with count, mean cost and latency, and linear fits."""
    if scale not in ("log", "quantile"):
        raise InvalidRequest(f"'scale' must be log or quantile; got {scale!r}", param="scale")
    if not 1 <= buckets <= 100:
        raise InvalidRequest(f"'buckets' must be between 1 and 100; got {buckets}", param="buckets")
    t = traces
    conds = [
        t.c.started_at_ms >= start_ms,
        t.c.started_at_ms < end_ms,
        t.c.status == "ok",
        t.c.prompt_tokens > 0,
        t.c.cost_usd.is_not(None),
    ]
    if model:
        conds.append(t.c.model == model)
    q = (
        select(t.c.prompt_tokens, t.c.cost_usd, t.c.duration_ms)
        .where(and_(*conds))
        .order_by(t.c.started_at_ms.desc())
        .limit(limit)
    )
    with engine.connect() as conn:
        rows = sorted((int(r[0]), float(r[1]), float(r[2])) for r in conn.execute(q))
    xs = [r[0] for r in rows]
    out: dict[str, Any] = {
        "model": model,
        "from_ms": start_ms,
        "to_ms": end_ms,
        "scale": scale,
        "points": len(rows),
        "truncated": len(rows) >= limit,
        "buckets": [],
        "cost_fit": None,
        "latency_fit": None,
        "note": None,
    }
    if not rows:
        out["note"] = "not enough data: no priced successful calls with prompt tokens in the window"
        return out
    total_cost = sum(r[1] for r in rows)
    starts = _bucket_bounds(xs, buckets, scale)
    for j, s in enumerate(starts):
        e = starts[j + 1] if j + 1 < len(starts) else len(rows)
        part = rows[s:e]
        k = len(part)
        cost = sum(r[1] for r in part)
        out["buckets"].append(
            {
                "min_prompt_tokens": part[0][0],
                "max_prompt_tokens": part[-1][0],
                "count": k,
                "mean_prompt_tokens": sum(r[0] for r in part) / k,
                "mean_cost_usd": cost / k,
                "mean_latency_ms": sum(r[2] for r in part) / k,
                "cost_usd": cost,
                "share_of_cost": cost / total_cost if total_cost > 0 else None,
            }
        )
    fx = [float(x) for x in xs]
    cf = linear_fit(fx, [r[1] for r in rows])
    lf = linear_fit(fx, [r[2] for r in rows])
    if cf is None:
        out["note"] = (
            f"not enough data for a fit: {len(rows)} call(s), "
            f"{len(set(xs))} distinct prompt length(s) (need at least 3 calls and 2 lengths)"
        )
    else:
        out["cost_fit"] = {
            "intercept_usd": cf["intercept"],
            "usd_per_prompt_token": cf["slope"],
            "usd_per_1k_prompt_tokens": cf["slope"] * 1000,
            "r2": cf["r2"],
            "n": cf["n"],
        }
    if lf is not None:
        out["latency_fit"] = {
            "intercept_ms": lf["intercept"],
            "ms_per_1k_prompt_tokens": lf["slope"] * 1000,
            "r2": lf["r2"],
            "n": lf["n"],
        }
    if not model and cf is not None:
        out["note"] = "all models together: pass model= for a fit of one model's prices"
    return out


# -- model comparison ----------------------------------------------------------


def compare(engine: Engine, *, models: list[str], start_ms: int, end_ms: int) -> dict[str, Any]:
    """Requests, error rate, latency, tokens and cost per request of each model, side by side."""
    cols = (*_SUMS, *LAT_COLS)
    with engine.connect() as conn:
        sums = rollup_sums(conn, start_ms, end_ms, "model", cols=cols, models=models)
        unknown, _ = unknown_cost_counts(conn, start_ms, end_ms, "model", models=models)
    data = []
    for m in models:
        acc = sums.get(m) or _empty(cols)
        n = int(acc["requests"])
        cost = float(acc["cost_usd"])
        lat = [int(acc[c]) for c in LAT_COLS]
        data.append(
            {
                "model": m,
                "requests": n,
                "errors": int(acc["errors"]),
                "error_rate": acc["errors"] / n if n else None,
                "latency_mean_ms": acc["latency_sum_ms"] / n if n else None,
                "latency_p50_ms": percentile(lat, 0.50),
                "latency_p95_ms": percentile(lat, 0.95),
                "mean_prompt_tokens": acc["prompt_tokens"] / n if n else None,
                "mean_completion_tokens": acc["completion_tokens"] / n if n else None,
                "cost_usd": cost,
                "cost_per_request": cost / n if n else None,
                "cost_per_1k_requests": _per_1k(cost, n),
                "unknown_cost_requests": unknown.get(m, 0),
            }
        )
    return {
        "from_ms": start_ms,
        "to_ms": end_ms,
        "from": iso(start_ms),
        "to": iso(end_ms),
        "data": data,
        "note": COMPARE_NOTE,
    }


def parse_models(value: str | None) -> list[str]:
    models = [m.strip() for m in (value or "").split(",") if m.strip()]
    if not models:
        raise InvalidRequest(
            "'models' is required: a comma-separated list of model names (e.g. gpt-4o,claude)",
            param="models",
        )
    if len(models) > 20:
        raise InvalidRequest("'models': at most 20 models at a time", param="models")
    return list(dict.fromkeys(models))


__all__ = [
    "GROUPS",
    "by_input_length",
    "check_range",
    "compare",
    "cost_report",
    "linear_fit",
    "parse_models",
    "unknown_cost_counts",
]
