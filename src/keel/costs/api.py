"""REST: ``GET /api/costs``, ``/api/costs/by-input-length`` and ``/api/costs/compare``."""

from __future__ import annotations

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy.engine import Engine

from keel.costs import reports
from keel.tracing.api import parse_time

_TIME_DOC = "ISO 8601 (2026-01-31T12:00:00Z), epoch ms, or an age (24h, 7d)."


class CostGroup(BaseModel):
    group: str = Field(description="The model, provider, key id, user, feature or day (UTC).")
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float = Field(description="Spend; calls with an unknown price add 0.")
    cost_per_1k_requests: float | None
    share: float | None = Field(description="Share of the window's total spend (0..1).")
    unknown_cost_requests: int = Field(
        description="Calls with tokens but no known price (from the most recent traces)."
    )
    projected_monthly_usd: float | None = Field(
        description="This group's spend of the last 7 days × 30/7 (null for group_by=day)."
    )


class CostTotal(BaseModel):
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cost_per_1k_requests: float | None
    unknown_cost_requests: int


class Projection(BaseModel):
    method: str
    base_from_ms: int
    base_to_ms: int
    base_days: int
    base_cost_usd: float = Field(description="Spend of the last base_days, up to now.")
    observed_days: float | None = Field(description="Days of the base with traffic.")
    projected_monthly_usd: float
    note: str | None = None


class CostReport(BaseModel):
    group_by: str
    from_ms: int
    to_ms: int
    from_: str = Field(alias="from")
    to: str
    data: list[CostGroup]
    total: CostTotal
    unknown_cost_scanned: int = Field(
        description="Traces scanned to count unknown costs (the most recent of the window)."
    )
    unknown_cost_complete: bool = Field(
        description="False when the window had more traces than were scanned."
    )
    projection: Projection


class LengthBucket(BaseModel):
    min_prompt_tokens: int
    max_prompt_tokens: int
    count: int
    mean_prompt_tokens: float
    mean_cost_usd: float
    mean_latency_ms: float
    cost_usd: float
    share_of_cost: float | None


class CostFit(BaseModel):
    intercept_usd: float
    usd_per_prompt_token: float
    usd_per_1k_prompt_tokens: float
    r2: float
    n: int


class LatencyFit(BaseModel):
    intercept_ms: float
    ms_per_1k_prompt_tokens: float
    r2: float
    n: int


class LengthReport(BaseModel):
    model: str | None
    from_ms: int
    to_ms: int
    scale: str
    points: int = Field(description="Priced successful calls used (the most recent).")
    truncated: bool = Field(description="True when the scan limit cut older calls off.")
    buckets: list[LengthBucket]
    cost_fit: CostFit | None = Field(description="cost ≈ intercept + slope × prompt tokens.")
    latency_fit: LatencyFit | None
    note: str | None = None


class CompareRow(BaseModel):
    model: str
    requests: int
    errors: int
    error_rate: float | None
    latency_mean_ms: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    mean_prompt_tokens: float | None
    mean_completion_tokens: float | None
    cost_usd: float
    cost_per_request: float | None
    cost_per_1k_requests: float | None
    unknown_cost_requests: int


class CompareReport(BaseModel):
    from_ms: int
    to_ms: int
    from_: str = Field(alias="from")
    to: str
    data: list[CompareRow]
    note: str


def make_router(engine: Engine) -> APIRouter:
    router = APIRouter(prefix="/api/costs", tags=["costs"])

    @router.get(
        "",
        response_model=CostReport,
        summary="Spend by model, provider, key, user, feature or day, with a projection",
    )
    def costs(
        group_by: str = Query("model", description=", ".join(reports.GROUPS)),
        from_: str | None = Query(None, alias="from", description=_TIME_DOC + " Default: 30d."),
        to: str | None = Query(None, description=_TIME_DOC + " Default: now."),
    ) -> CostReport:
        start, end = reports.check_range(
            parse_time(from_, "from"), parse_time(to, "to"), default_days=30
        )
        return CostReport.model_validate(
            reports.cost_report(engine, group_by=group_by, start_ms=start, end_ms=end)
        )

    @router.get(
        "/by-input-length",
        response_model=LengthReport,
        summary="Cost and latency against prompt length: buckets and a linear fit",
    )
    def by_input_length(
        model: str | None = Query(None, description="A model alias (recommended for the fit)."),
        since: str = Query("7d", description=_TIME_DOC),
        until: str | None = Query(None, description=_TIME_DOC + " Default: now."),
        buckets: int = Query(10, description="Number of buckets (1-100)."),
        scale: str = Query("log", description="log: log-spaced lengths; quantile: equal counts."),
    ) -> LengthReport:
        start, end = reports.check_range(
            parse_time(since, "since"), parse_time(until, "until"), default_days=7
        )
        return LengthReport.model_validate(
            reports.by_input_length(
                engine, model=model, start_ms=start, end_ms=end, buckets=buckets, scale=scale
            )
        )

    @router.get(
        "/compare",
        response_model=CompareReport,
        summary="Models side by side over the same period: errors, latency, tokens, cost",
    )
    def compare(
        models: str | None = Query(None, description="Comma-separated model aliases."),
        since: str = Query("7d", description=_TIME_DOC),
        until: str | None = Query(None, description=_TIME_DOC + " Default: now."),
    ) -> CompareReport:
        names = reports.parse_models(models)
        start, end = reports.check_range(
            parse_time(since, "since"), parse_time(until, "until"), default_days=7
        )
        return CompareReport.model_validate(
            reports.compare(engine, models=names, start_ms=start, end_ms=end)
        )

    return router
