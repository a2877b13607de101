"""Alert signals of scores and of the online evaluation queue.

Importing this module registers them (``app.py`` and the rule validation import
it next to :mod:`keel.alerts.sources`):

- ``eval_score_mean``, ``eval_pass_rate``, ``eval_scores``: from the per-minute
  score rollups, labels ``name``, ``model``, ``source``; e.g. alert when the
  judge's mean over 15 minutes drops below 0.7:
  ``{signal: eval_score_mean, filters: {name: helpfulness}, window: 15m,
  condition: {op: below, threshold: 0.7}}``;
- ``eval_queue_backlog`` (pending jobs now) and ``eval_failures`` (jobs that
  failed for good in the window), label ``evaluator``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Float, cast, func, select

from keel.alerts.model import Labels
from keel.alerts.signals import EvalContext, Signal, SignalQuery, register_signal
from keel.alerts.sources import _group, _memo, rollup_range
from keel.evals import online_queue
from keel.store.tables_quality import score_rollups_minute

_SCORE_LABELS = ("name", "model", "source")
_N, _SUM, _PASS, _FAIL = range(4)


def _score_rows(ctx: EvalContext, q: SignalQuery) -> list[tuple[dict[str, str], list[float]]]:
    start, end = rollup_range(q)
    r = score_rollups_minute

    def run() -> list[tuple[dict[str, str], list[float]]]:
        stmt = (
            select(
                r.c.name,
                r.c.model,
                r.c.source,
                # PostgreSQL sums BIGINT into NUMERIC: cast to float on both dialects.
                cast(func.sum(r.c["count"]), Float),
                cast(func.sum(r.c.value_sum), Float),
                cast(func.sum(r.c.passed), Float),
                cast(func.sum(r.c.failed), Float),
            )
            .where(r.c.minute_ms >= start, r.c.minute_ms < end)
            .group_by(r.c.name, r.c.model, r.c.source)
        )
        with ctx.engine.connect() as conn:
            return [
                ({"name": n, "model": m or "", "source": s}, [float(x or 0) for x in sums])
                for n, m, s, *sums in conn.execute(stmt)
            ]

    return _memo(ctx, ("score-rollups", start, end), run)


class _ScoreSignal(Signal):
    labels = _SCORE_LABELS

    def reduce(self, acc: list[float]) -> float | None:
        raise NotImplementedError

    def values(self, ctx: EvalContext, q: SignalQuery) -> dict[Labels, float | None]:
        out: dict[Labels, float | None] = {}
        for key, items in _group(_score_rows(ctx, q), q).items():
            acc = [sum(col) for col in zip(*items, strict=True)]
            out[key] = self.reduce(acc)
        if not q.group_by and () not in out:
            out[()] = self.reduce([0.0, 0.0, 0.0, 0.0])
        return out


@register_signal
class EvalScoreMean(_ScoreSignal):
    name = "eval_score_mean"
    description = "Mean score (online evaluators, judges, feedback) in the window."
    unit = "ratio"

    def reduce(self, acc: list[float]) -> float | None:
        return acc[_SUM] / acc[_N] if acc[_N] else None


@register_signal
class EvalPassRate(_ScoreSignal):
    name = "eval_pass_rate"
    description = "Share of scores that passed (0-1), among those with a pass/fail outcome."
    unit = "ratio"

    def reduce(self, acc: list[float]) -> float | None:
        n = acc[_PASS] + acc[_FAIL]
        return acc[_PASS] / n if n else None


@register_signal
class EvalScores(_ScoreSignal):
    name = "eval_scores"
    description = "Scores with a value recorded in the window."
    unit = "count"

    def reduce(self, acc: list[float]) -> float | None:
        return acc[_N]


class _QueueSignal(Signal):
    unit = "count"
    labels = ("evaluator",)

    def counts(self, ctx: EvalContext, q: SignalQuery) -> dict[str, int]:
        raise NotImplementedError

    def values(self, ctx: EvalContext, q: SignalQuery) -> dict[Labels, float | None]:
        items: Iterable[tuple[dict[str, str], Any]] = (
            ({"evaluator": ev}, n) for ev, n in self.counts(ctx, q).items()
        )
        out: dict[Labels, float | None] = {k: float(sum(v)) for k, v in _group(items, q).items()}
        if not q.group_by and () not in out:
            out[()] = 0.0
        return out


@register_signal
class EvalQueueBacklog(_QueueSignal):
    name = "eval_queue_backlog"
    description = "Online evaluation jobs waiting now (the window is ignored)."

    def counts(self, ctx: EvalContext, q: SignalQuery) -> dict[str, int]:
        return _memo(ctx, ("eval-backlog",), lambda: online_queue.backlog(ctx.engine))


@register_signal
class EvalFailures(_QueueSignal):
    name = "eval_failures"
    description = "Online evaluation jobs that failed for good (attempts used up) in the window."

    def counts(self, ctx: EvalContext, q: SignalQuery) -> dict[str, int]:
        start = q.end_ms - q.window_ms
        return _memo(
            ctx,
            ("eval-failures", start, q.end_ms),
            lambda: online_queue.failed_between(ctx.engine, start, q.end_ms),
        )


__all__ = ["EvalFailures", "EvalPassRate", "EvalQueueBacklog", "EvalScoreMean", "EvalScores"]
