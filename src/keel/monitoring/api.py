"""REST: ``/api/metrics/summary``, ``/api/metrics/timeseries``, ``/api/resources``."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from keel.monitoring import summary as sm
from keel.store.tables import resource_samples


class Figures(BaseModel):
    requests: int
    errors: int
    error_rate: float
    rps: float
    streams: int
    latency_mean_ms: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    ttft_p99_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float


class GroupFigures(Figures):
    group: str


class Summary(BaseModel):
    window: str
    group_by: str
    from_ms: int = Field(alias="from")
    to_ms: int = Field(alias="to")
    data: list[GroupFigures]
    total: Figures


class Series(BaseModel):
    group: str
    points: list[tuple[int, float | None]] = Field(
        description="[bucket start (epoch ms, UTC), value]; null where nothing was measured."
    )


class TimeSeries(BaseModel):
    metric: str
    window: str
    step: str
    group_by: str
    series: list[Series]


class ResourceSample(BaseModel):
    instance: str
    ts_ms: int
    process_cpu_percent: float | None
    host_cpu_percent: float | None
    process_rss_bytes: int | None
    host_mem_used_bytes: int | None
    host_mem_total_bytes: int | None
    open_connections: int | None
    loop_lag_ms: float | None
    recorder_queue_depth: int | None
    recorder_spilled: int | None
    recorder_dropped: int | None
    gpu: list[dict[str, Any]] | None = Field(
        None, description="One entry per GPU; null when the host has none (NVML absent)."
    )


class Resources(BaseModel):
    data: list[ResourceSample] = Field(description="The latest sample of each instance.")


def latest_resources(engine: Engine) -> list[dict[str, Any]]:
    t = resource_samples
    last = (
        select(t.c.instance, func.max(t.c.ts_ms).label("ts"))
        .where(
            t.c.ts_ms >= func.coalesce(select(func.max(t.c.ts_ms)).scalar_subquery(), 0) - 3_600_000
        )
        .group_by(t.c.instance)
        .subquery()
    )
    q = select(t).join(last, (t.c.instance == last.c.instance) & (t.c.ts_ms == last.c.ts))
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(q)]
    for r in rows:
        r["gpu"] = orjson.loads(r["gpu"]) if r["gpu"] else None
    return rows


def make_router(engine: Engine) -> APIRouter:
    r = APIRouter(tags=["metrics"])

    @r.get(
        "/api/metrics/summary",
        response_model=Summary,
        response_model_by_alias=True,
        summary="Requests, errors, latency and TTFT percentiles, tokens — from rollups",
    )
    def _summary(
        window: str = Query("1h", description=", ".join(sm.WINDOWS)),
        group_by: str = Query("model", description=", ".join(sm.GROUPS)),
        model: str | None = None,
        provider: str | None = None,
    ) -> dict[str, Any]:
        return sm.summary(engine, window=window, group_by=group_by, model=model, provider=provider)

    @r.get(
        "/api/metrics/timeseries",
        response_model=TimeSeries,
        summary="One metric over time, per step, for charts",
    )
    def _timeseries(
        metric: str = Query(..., description=", ".join(sm.METRICS)),
        window: str = Query("1h", description=", ".join(sm.WINDOWS)),
        step: str = Query("1m", description=", ".join(sm.STEPS)),
        group_by: str = Query("none", description=", ".join(sm.GROUPS)),
        model: str | None = None,
        provider: str | None = None,
    ) -> dict[str, Any]:
        return sm.timeseries(
            engine,
            metric=metric,
            window=window,
            step=step,
            group_by=group_by,
            model=model,
            provider=provider,
        )

    @r.get(
        "/api/resources",
        response_model=Resources,
        summary="Latest CPU, memory, GPU, event-loop lag and recorder queue per instance",
    )
    def _resources() -> dict[str, Any]:
        return {"data": latest_resources(engine)}

    return r
