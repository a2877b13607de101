"""Reading stored drift runs (the API and the CLI)."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from keel.errors import NotFound
from keel.store.tables_quality import drift_runs


def _run(row: Any, full: bool) -> dict[str, Any]:
    d = {str(k): v for k, v in row._mapping.items()}  # keys are quoted_name: plain str
    d["reference"] = orjson.loads(d["reference"]) if d.get("reference") else {}
    report = orjson.loads(d.pop("report")) if d.get("report") else {}
    d["status"] = report.get("status", "ok")
    d["message"] = report.get("message") or None
    d["drifted_features"] = report.get("drifted_features", [])
    if full:
        d["report"] = report
    return d


def list_runs(
    engine: Engine, monitor: str | None = None, limit: int = 20, before_ms: int | None = None
) -> list[dict[str, Any]]:
    """Runs, newest first, without their reports (status and drifted features included)."""
    t = drift_runs
    q = select(t).order_by(t.c.computed_at_ms.desc(), t.c.id.desc()).limit(limit)
    if monitor:
        q = q.where(t.c.monitor == monitor)
    if before_ms is not None:
        q = q.where(t.c.computed_at_ms < before_ms)
    with engine.connect() as conn:
        return [_run(r, full=False) for r in conn.execute(q)]


def get_run(engine: Engine, run_id: str) -> dict[str, Any]:
    """One run with its full report."""
    with engine.connect() as conn:
        row = conn.execute(select(drift_runs).where(drift_runs.c.id == run_id)).first()
    if row is None:
        raise NotFound(f"no drift run '{run_id}' (see `keel drift list`)")
    return _run(row, full=True)


def latest_run(engine: Engine, monitor: str, *, full: bool = False) -> dict[str, Any] | None:
    t = drift_runs
    q = (
        select(t)
        .where(t.c.monitor == monitor)
        .order_by(t.c.computed_at_ms.desc(), t.c.id.desc())
        .limit(1)
    )
    with engine.connect() as conn:
        row = conn.execute(q).first()
    return _run(row, full=full) if row is not None else None


def run_counts(engine: Engine) -> dict[str, int]:
    """Stored runs per monitor."""
    t = drift_runs
    with engine.connect() as conn:
        return dict(conn.execute(select(t.c.monitor, func.count()).group_by(t.c.monitor)).all())
