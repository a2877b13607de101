"""REST: drift monitors (config and latest result), their runs, one run's full report,
and ``POST /api/drift/monitors/{name}/run`` (admin) to compute one now."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from keel.drift.monitor import DriftRunner
from keel.drift.runs import get_run, latest_run, list_runs
from keel.errors import ConfigError


class RunSummary(BaseModel):
    id: str
    monitor: str
    computed_at_ms: int
    window_start_ms: int
    window_end_ms: int
    reference: dict[str, Any] = Field(description="What the window was compared with.")
    n_current: int
    n_reference: int
    drifted: bool
    status: str = Field(description="ok | insufficient_data | error")
    message: str | None = Field(description="Why a run is not ok.")
    drifted_features: list[str]


class Run(RunSummary):
    report: dict[str, Any] = Field(
        description="Per feature: tests (statistic, p_value, threshold, drifted), summaries of "
        "both sides, topics with example inputs; skipped features; notes."
    )


class Monitor(BaseModel):
    name: str
    config: dict[str, Any]
    last_run: RunSummary | None
    error: str | None = Field(description="The last failure of this monitor in this process.")


class MonitorList(BaseModel):
    data: list[Monitor]
    embeddings: str | None = Field(
        description="Why embedding features are missing (null when they are computed)."
    )


class RunList(BaseModel):
    data: list[RunSummary]


def make_router(runner: DriftRunner, errors: dict[str, str] | None = None) -> APIRouter:
    """``errors``: the drift daemon's last failure per monitor, when it runs here."""
    r = APIRouter(prefix="/api/drift", tags=["drift"])
    engine = runner.engine

    @r.get("/monitors", response_model=MonitorList, summary="Monitors with their latest run")
    async def monitors() -> MonitorList:
        def load() -> MonitorList:
            data = [
                Monitor(
                    name=m.name,
                    config=m.model_dump(mode="json"),
                    last_run=latest_run(engine, m.name),
                    error=(errors or {}).get(m.name),
                )
                for m in runner.settings.monitors
            ]
            return MonitorList(data=data, embeddings=runner.embedder.reason)

        return await run_in_threadpool(load)

    @r.get("/runs", response_model=RunList, summary="Runs, newest first")
    async def runs(
        monitor: str | None = Query(None, max_length=200, description="Only this monitor."),
        limit: int = Query(20, ge=1, le=500),
        before_ms: int | None = Query(None, description="Only runs computed before (paging)."),
    ) -> RunList:
        rows = await run_in_threadpool(list_runs, engine, monitor, limit, before_ms)
        return RunList(data=[RunSummary(**x) for x in rows])

    @r.get("/runs/{run_id}", response_model=Run, summary="One run with its full report")
    async def run(run_id: str) -> Run:
        return Run(**await run_in_threadpool(get_run, engine, run_id))

    @r.post("/monitors/{name}/run", response_model=Run, summary="Compute a monitor's run now")
    async def run_now(name: str) -> Run:
        def go() -> dict[str, Any]:
            try:
                done = runner.run(name)
            except ConfigError as e:
                # The configuration names something the store lacks: the request
                # conflicts with the current state, the server itself is fine.
                raise ConfigError(e.message, status=409) from None
            return get_run(engine, done["id"])

        return Run(**await run_in_threadpool(go))

    return r
