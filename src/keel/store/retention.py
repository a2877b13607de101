"""Retention: delete raw data older than ``retention.days`` and rollups older than
``retention.rollup_days``, in bounded batches so no transaction holds locks long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sqlalchemy import Column, Table, delete, select
from sqlalchemy.engine import Engine

from keel.config import RetentionSettings
from keel.daemon import Daemon, now_ms
from keel.store.tables import (
    component_checks,
    resource_samples,
    rollups_dim_minute,
    rollups_hour,
    rollups_minute,
    spans,
    traces,
)
from keel.store.tables_quality import (
    drift_runs,
    drift_scores,
    eval_jobs,
    score_rollups_minute,
    scores,
    trace_features,
)

log = logging.getLogger("keel.retention")
DAY_MS = 86_400_000


def _targets(s: RetentionSettings, now: int) -> list[tuple[Table, Column, list[Column], int]]:
    raw = now - s.days * DAY_MS
    roll = now - s.rollup_days * DAY_MS
    return [
        (traces, traces.c.started_at_ms, [traces.c.id], raw),
        (spans, spans.c.start_us, [spans.c.trace_id, spans.c.span_id], raw * 1000),
        (
            resource_samples,
            resource_samples.c.ts_ms,
            [resource_samples.c.ts_ms, resource_samples.c.instance],
            raw,
        ),
        (
            component_checks,
            component_checks.c.ts_ms,
            [component_checks.c.ts_ms, component_checks.c.component],
            raw,
        ),
        (rollups_minute, rollups_minute.c.minute_ms, [], roll),
        (rollups_hour, rollups_hour.c.minute_ms, [], roll),
        (rollups_dim_minute, rollups_dim_minute.c.minute_ms, [], roll),
        # Quality data: per-trace work goes with the traces; scores and drift
        # results are history that dashboards and reports read, kept like rollups.
        (trace_features, trace_features.c.started_at_ms, [trace_features.c.trace_id], raw),
        (eval_jobs, eval_jobs.c.created_at_ms, [eval_jobs.c.id], raw),
        (scores, scores.c.created_at_ms, [scores.c.id], roll),
        (score_rollups_minute, score_rollups_minute.c.minute_ms, [], roll),
        (drift_runs, drift_runs.c.computed_at_ms, [drift_runs.c.id], roll),
        (drift_scores, drift_scores.c.computed_at_ms, [], roll),
    ]


def purge(
    engine: Engine,
    settings: RetentionSettings,
    *,
    now: int | None = None,
    time_budget_s: float = 60.0,
) -> dict[str, int]:
    """Delete what is past retention; returns rows deleted per table."""
    deadline = time.monotonic() + time_budget_s
    deleted: dict[str, int] = {}
    for table, ts_col, key_cols, cutoff in _targets(settings, now or now_ms()):
        total = 0
        while time.monotonic() < deadline:
            with engine.begin() as conn:
                if len(key_cols) == 1:
                    # Delete one bounded batch of the oldest rows.
                    sub = select(key_cols[0]).where(ts_col < cutoff).limit(settings.batch_size)
                    n = conn.execute(delete(table).where(key_cols[0].in_(sub))).rowcount
                else:
                    # Composite keys: delete by time slices bounded by the batch's max time.
                    q = (
                        select(ts_col)
                        .where(ts_col < cutoff)
                        .order_by(ts_col)
                        .offset(settings.batch_size - 1)
                        .limit(1)
                    )
                    edge = conn.execute(q).scalar()
                    bound = cutoff if edge is None else min(cutoff, edge + 1)
                    n = conn.execute(delete(table).where(ts_col < bound)).rowcount
            total += n or 0
            if not n or n < settings.batch_size:
                break
        deleted[table.name] = total
    return deleted


class RetentionDaemon(Daemon):
    name = "retention"
    singleton = True

    def __init__(self, engine: Engine, settings: RetentionSettings) -> None:
        self.interval_s = settings.interval_s
        super().__init__(engine)
        self.settings = settings
        self.last: dict[str, Any] = {}

    async def tick(self) -> None:
        assert self.engine is not None
        self.last = await asyncio.to_thread(purge, self.engine, self.settings)
        if any(self.last.values()):
            log.info("retention deleted %s", {k: v for k, v in self.last.items() if v})
