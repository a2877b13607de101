"""Canary versus production over a window of real traffic, and the decision it leads to.

Both sides are read from the gateway's traces of the alias, told apart by
``traces.route_version`` (``NULL`` is the keel.yaml alias when it is the
baseline), from the moment the canary started. Per side:

- ``requests`` and ``error_rate`` (calls the client cancelled are left out),
- ``p95_ms`` of successful calls (a fast failure must not make a side look quick),
- ``cost_per_request`` over successful calls that were priced,
- the mean of each online eval score (``scores`` of source ``online`` on those traces).

:func:`decide` turns two sides and the settings into ``wait``, ``promote`` or
``rollback`` with a reason that carries the numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keel.store.tables import traces
from keel.store.tables_quality import scores

T = traces.c


@dataclass
class Side:
    ref: str  # "name@3", or "static" for the keel.yaml alias
    requests: int = 0
    errors: int = 0
    p95_ms: float | None = None
    cost_per_request: float | None = None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # name → {count, mean}

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "error_rate": self.error_rate}


@dataclass
class Limits:
    """The thresholds a canary must stay within (from ``deploy`` settings)."""

    min_requests: int
    max_error_rate_increase: float
    max_p95_ratio: float
    min_p95_increase_ms: float
    max_cost_ratio: float
    min_score_delta: float
    min_scores: int


def _side_filter(ref: str | None) -> Any:
    return T.route_version.is_(None) if ref is None else (T.route_version == ref)


def measure(engine: Engine, alias: str, ref: str | None, since_ms: int, until_ms: int) -> Side:
    """One side's numbers over [since_ms, until_ms)."""
    base = (
        (T.model == alias)
        & (T.started_at_ms >= since_ms)
        & (T.started_at_ms < until_ms)
        & (T.status != "cancelled")
        & _side_filter(ref)
    )
    side = Side(ref or "static")
    ok = base & (T.status == "ok")
    with engine.connect() as c:
        n, errors = c.execute(
            sa.select(
                sa.func.count(),
                sa.func.coalesce(sa.func.sum(sa.case((T.status != "ok", 1), else_=0)), 0),
            ).where(base)
        ).one()
        side.requests, side.errors = int(n), int(errors)
        n_ok = side.requests - side.errors
        if n_ok:
            # The nearest-rank p95, sorted by the store: no rows travel.
            k = max(0, math.ceil(0.95 * n_ok) - 1)
            side.p95_ms = c.execute(
                sa.select(T.duration_ms).where(ok).order_by(T.duration_ms).limit(1).offset(k)
            ).scalar()
            priced, cost = c.execute(
                sa.select(sa.func.count(T.cost_usd), sa.func.sum(T.cost_usd)).where(ok)
            ).one()
            if priced:
                side.cost_per_request = float(cost or 0.0) / int(priced)
        s = scores.c
        rows = c.execute(
            sa.select(s.name, sa.func.count(s.value), sa.func.avg(s.value))
            .select_from(scores.join(traces, traces.c.id == s.trace_id))
            .where(base & (s.source == "online") & s.value.is_not(None))
            .group_by(s.name)
        )
        for name, count, mean in rows:
            if count:
                side.scores[name] = {"count": int(count), "mean": float(mean)}
    return side


@dataclass
class Decision:
    action: str  # wait | promote | rollback
    reason: str
    failed: list[dict[str, Any]] = field(default_factory=list)  # the checks that failed


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.2f}%"


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f} ms"


def checks(canary: Side, base: Side, lim: Limits) -> list[dict[str, Any]]:
    """Every comparison that can be made, each with its numbers and whether it passed."""
    out: list[dict[str, Any]] = []
    ce, be = canary.error_rate, base.error_rate
    if ce is not None and be is not None:
        out.append(
            {
                "check": "error_rate",
                "canary": ce,
                "baseline": be,
                "limit": lim.max_error_rate_increase,
                "passed": ce - be <= lim.max_error_rate_increase,
                "text": f"error rate {_pct(ce)} vs {_pct(be)} "
                f"(limit +{_pct(lim.max_error_rate_increase)})",
            }
        )
    if canary.p95_ms is not None and base.p95_ms:
        ratio = canary.p95_ms / base.p95_ms
        out.append(
            {
                "check": "p95_latency",
                "canary": canary.p95_ms,
                "baseline": base.p95_ms,
                "ratio": ratio,
                "limit": lim.max_p95_ratio,
                "passed": ratio <= lim.max_p95_ratio
                or canary.p95_ms - base.p95_ms <= lim.min_p95_increase_ms,
                "text": f"p95 latency {_ms(canary.p95_ms)} vs {_ms(base.p95_ms)} "
                f"({ratio:.2f}x, limit {lim.max_p95_ratio:g}x and "
                f"+{lim.min_p95_increase_ms:g} ms)",
            }
        )
    if canary.cost_per_request is not None and base.cost_per_request:
        ratio = canary.cost_per_request / base.cost_per_request
        out.append(
            {
                "check": "cost_per_request",
                "canary": canary.cost_per_request,
                "baseline": base.cost_per_request,
                "ratio": ratio,
                "limit": lim.max_cost_ratio,
                "passed": ratio <= lim.max_cost_ratio,
                "text": f"cost/request ${canary.cost_per_request:.6f} vs "
                f"${base.cost_per_request:.6f} ({ratio:.2f}x, limit {lim.max_cost_ratio:g}x)",
            }
        )
    for name in sorted(set(canary.scores) & set(base.scores)):
        c, b = canary.scores[name], base.scores[name]
        if c["count"] < lim.min_scores or b["count"] < lim.min_scores:
            continue
        delta = c["mean"] - b["mean"]
        out.append(
            {
                "check": f"score:{name}",
                "canary": c["mean"],
                "baseline": b["mean"],
                "delta": delta,
                "limit": lim.min_score_delta,
                "passed": delta >= lim.min_score_delta,
                "text": f"online score {name} {c['mean']:.3f} vs {b['mean']:.3f} "
                f"(delta {delta:+.3f}, limit {lim.min_score_delta:+g})",
            }
        )
    return out


def decide(
    canary: Side,
    base: Side,
    lim: Limits,
    *,
    elapsed_s: float,
    window_s: float,
    max_window_s: float,
    on_insufficient: str = "rollback",
    early_rollback: bool = True,
) -> Decision:
    """What to do now with a canary that has run ``elapsed_s`` seconds."""
    enough = canary.requests >= lim.min_requests and base.requests >= lim.min_requests
    counts = f"{canary.requests} canary vs {base.requests} baseline calls"
    if early_rollback and canary.requests >= lim.min_requests and base.requests >= lim.min_requests:
        bad = [
            c for c in checks(canary, base, lim) if c["check"] == "error_rate" and not c["passed"]
        ]
        if bad:
            return Decision("rollback", f"{bad[0]['text']} over {counts}", bad)
    if elapsed_s < window_s:
        return Decision("wait", f"window {elapsed_s:.0f}/{window_s:.0f} s; {counts}")
    if not enough:
        if elapsed_s < max_window_s:
            return Decision(
                "wait", f"not enough traffic yet ({counts}; {lim.min_requests} needed per side)"
            )
        return Decision(
            on_insufficient,
            f"not enough traffic after {elapsed_s:.0f} s ({counts}; {lim.min_requests} needed "
            f"per side): {'rolled back' if on_insufficient == 'rollback' else 'promoted'} "
            "as deploy.on_insufficient_traffic says",
        )
    results = checks(canary, base, lim)
    failed = [c for c in results if not c["passed"]]
    if failed:
        return Decision(
            "rollback", "; ".join(c["text"] for c in failed) + f" over {counts}", failed
        )
    summary = "; ".join(c["text"] for c in results) or "no comparable metric"
    return Decision("promote", f"within limits over {counts}: {summary}")
