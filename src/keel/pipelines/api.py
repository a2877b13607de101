"""REST under ``/api/pipelines``: pipeline runs with their steps, trigger and links."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from keel.pipelines import record


def make_router(engine: Engine) -> APIRouter:
    r = APIRouter(prefix="/api/pipelines", tags=["pipelines"])

    @r.get("/runs", summary="Pipeline runs, newest first")
    async def list_runs(
        pipeline: str | None = Query(None, description="Only this pipeline."),
        limit: int = Query(50, ge=1, le=1000),
    ) -> dict[str, Any]:
        rows = await run_in_threadpool(record.list_runs, engine, pipeline=pipeline, limit=limit)
        return {"data": rows}

    @r.get("/runs/{run_id}", summary="One pipeline run: steps, trigger, links")
    async def get_run(run_id: str) -> dict[str, Any]:
        return await run_in_threadpool(record.get_run, engine, run_id)

    return r
