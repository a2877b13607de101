"""Alert signals of drift monitors, read from the latest stored run of each monitor.

A rule's window is how recent that run must be: ``drift_detected`` over 1h is
the number of features that drifted in each monitor's latest run of the last
hour (no data when there was none, or it had too little data to compare).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select

from keel.alerts.model import Labels
from keel.alerts.signals import EvalContext, Signal, SignalQuery, register_signal
from keel.alerts.sources import _group, _memo
from keel.store.tables_quality import drift_runs, drift_scores

# (monitor, feature, test, statistic, p_value, drifted)
ScoreRow = tuple[str, str, str, float | None, float | None, bool]


def latest_scores(ctx: EvalContext, q: SignalQuery) -> list[ScoreRow]:
    """The score rows of each monitor's latest run computed in the window (one query each)."""
    start = q.end_ms - q.window_ms

    def run() -> list[ScoreRow]:
        with ctx.engine.connect() as conn:
            runs = conn.execute(
                select(drift_runs.c.id, drift_runs.c.monitor, drift_runs.c.computed_at_ms).where(
                    drift_runs.c.computed_at_ms >= start, drift_runs.c.computed_at_ms < q.end_ms
                )
            ).all()
            latest: dict[str, tuple[int, str]] = {}
            for rid, monitor, at in runs:
                if monitor not in latest or (at, rid) > latest[monitor]:
                    latest[monitor] = (at, rid)
            ids = [rid for _, rid in latest.values()]
            if not ids:
                return []
            s = drift_scores.c
            rows = conn.execute(
                select(s.monitor, s.feature, s.test, s.statistic, s.p_value, s.drifted).where(
                    s.run_id.in_(ids)
                )
            ).all()
        return [(r[0], r[1], r[2], r[3], r[4], bool(r[5])) for r in rows]

    return _memo(ctx, ("drift-scores", start, q.end_ms), run)


class _DriftSignal(Signal):
    labels = ("monitor", "feature", "test")

    def items(self, ctx: EvalContext, q: SignalQuery) -> Iterable[tuple[dict[str, str], Any]]:
        return (
            ({"monitor": r[0], "feature": r[1], "test": r[2]}, r) for r in latest_scores(ctx, q)
        )

    def reduce(self, rows: list[ScoreRow]) -> float | None:
        raise NotImplementedError

    def values(self, ctx: EvalContext, q: SignalQuery) -> dict[Labels, float | None]:
        return {k: self.reduce(v) for k, v in _group(self.items(ctx, q), q).items()}


@register_signal
class DriftScore(_DriftSignal):
    name = "drift_score"
    description = (
        "Statistic of a drift test in each monitor's latest run (PSI, KS D, JS distance, "
        "MMD²…; test=feature: severity, 1 = at the threshold); the largest when grouped."
    )
    unit = "ratio"  # unitless

    def reduce(self, rows: list[ScoreRow]) -> float | None:
        vals = [r[3] for r in rows if r[3] is not None]
        return max(vals) if vals else None


@register_signal
class DriftPValue(_DriftSignal):
    name = "drift_p_value"
    description = "p-value of a drift test in each monitor's latest run; the smallest when grouped."
    unit = "ratio"

    def reduce(self, rows: list[ScoreRow]) -> float | None:
        vals = [r[4] for r in rows if r[4] is not None]
        return min(vals) if vals else None


@register_signal
class DriftDetected(_DriftSignal):
    name = "drift_detected"
    description = (
        "Features that drifted in each monitor's latest run (no data: no run, or too few "
        "traces to compare)."
    )
    unit = "count"
    labels = ("monitor",)

    def items(self, ctx: EvalContext, q: SignalQuery) -> Iterable[tuple[dict[str, str], Any]]:
        return (({"monitor": r[0]}, r) for r in latest_scores(ctx, q) if r[2] == "feature")

    def reduce(self, rows: list[ScoreRow]) -> float | None:
        return float(sum(1 for r in rows if r[5])) if rows else None
