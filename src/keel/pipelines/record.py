"""The pipeline_runs / pipeline_steps rows: create, update, read, find reusable steps."""

from __future__ import annotations

from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keel._ids import new_id
from keel.daemon import now_ms
from keel.errors import NotFound
from keel.store.tables_pipelines import pipeline_runs as pr
from keel.store.tables_pipelines import pipeline_steps as ps

_JSON = ("links", "outputs")


def _row(r: Any) -> dict[str, Any]:
    d = dict(r._mapping)
    for k in _JSON:
        if k in d:
            d[k] = orjson.loads(d[k]) if d[k] else None
    return d


def create_run(
    engine: Engine,
    pipeline: str,
    *,
    file: str | None,
    trigger_kind: str,
    trigger_reason: str | None = None,
    status: str = "running",
    created_by: str | None = None,
) -> str:
    """A new pipeline run row (``queued`` when a trigger starts a subprocess for it)."""
    rid = new_id()
    t = now_ms()
    with engine.begin() as c:
        c.execute(
            pr.insert().values(
                id=rid, pipeline=pipeline, file=file, status=status, trigger_kind=trigger_kind,
                trigger_reason=trigger_reason, created_by=created_by, created_at_ms=t,
                started_at_ms=t if status == "running" else None, links="{}",
            )
        )  # fmt: skip
    return rid


def update_run(engine: Engine, run_id: str, **values: Any) -> None:
    if "links" in values:
        values["links"] = orjson.dumps(values["links"]).decode()
    with engine.begin() as c:
        c.execute(pr.update().where(pr.c.id == run_id).values(**values))


def put_step(engine: Engine, run_id: str, name: str, **values: Any) -> None:
    """Insert or update one step row."""
    if "outputs" in values:
        values["outputs"] = orjson.dumps(values["outputs"]).decode()
    with engine.begin() as c:
        done = c.execute(
            ps.update().where(ps.c.pipeline_run_id == run_id, ps.c.name == name).values(**values)
        )
        if not done.rowcount:
            c.execute(ps.insert().values(pipeline_run_id=run_id, name=name, **values))


def reusable_step(engine: Engine, pipeline: str, name: str, input_hash: str) -> dict | None:
    """The newest succeeded step of this pipeline with these inputs (its outputs stand)."""
    q = (
        sa.select(ps)
        .join(pr, pr.c.id == ps.c.pipeline_run_id)
        .where(
            pr.c.pipeline == pipeline,
            ps.c.name == name,
            ps.c.input_hash == input_hash,
            ps.c.status == "succeeded",
        )
        .order_by(ps.c.ended_at_ms.desc())
        .limit(1)
    )
    with engine.connect() as c:
        r = c.execute(q).first()
    return _row(r) if r is not None else None


def get_run(engine: Engine, run_id: str) -> dict[str, Any]:
    """A pipeline run with its steps in order."""
    with engine.connect() as c:
        r = c.execute(sa.select(pr).where(pr.c.id == run_id)).first()
        if r is None:
            r = c.execute(sa.select(pr).where(pr.c.id.like(f"{run_id}%"))).first()
        if r is None:
            raise NotFound(f"no pipeline run '{run_id}' (see `keel pipeline runs`)")
        steps = c.execute(sa.select(ps).where(ps.c.pipeline_run_id == r.id).order_by(ps.c.position))
        return {**_row(r), "steps": [_row(s) for s in steps]}


def list_runs(
    engine: Engine, *, pipeline: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    q = sa.select(pr).order_by(pr.c.created_at_ms.desc(), pr.c.id.desc()).limit(limit)
    if pipeline:
        q = q.where(pr.c.pipeline == pipeline)
    with engine.connect() as c:
        return [_row(r) for r in c.execute(q)]


def last_triggered(engine: Engine, pipeline: str, kinds: tuple[str, ...]) -> int | None:
    """When a run of this pipeline was last started by one of these trigger kinds."""
    q = sa.select(sa.func.max(pr.c.created_at_ms)).where(
        pr.c.pipeline == pipeline, pr.c.trigger_kind.in_(kinds)
    )
    with engine.connect() as c:
        return c.execute(q).scalar()
