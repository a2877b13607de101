"""REST: feedback on traces, scores, score time series, online evaluator status, agreement.

- ``POST /api/traces/{id}/feedback``: a score and/or label (and a comment) from an
  end user or a reviewer; any valid key may post it.
- ``GET /api/traces/{id}/scores``, ``GET /api/evals/scores``,
  ``GET /api/evals/scores/timeseries``, ``GET /api/evals/online``,
  ``GET /api/evals/agreement``.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Literal

from fastapi import APIRouter, Body, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from keel.config.alerts import parse_duration
from keel.config.quality import EvalsSettings
from keel.errors import InvalidRequest, NotFound
from keel.evals import scores as sc
from keel.store.tables import traces

MAX_COMMENT = 10_000


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("user", min_length=1, max_length=200, description="What is rated.")
    score: float | None = Field(None, description="A number (e.g. 1-5, or 1/0 for thumbs).")
    label: str | None = Field(None, min_length=1, max_length=200, description="A category.")
    passed: bool | None = Field(None, description="A pass/fail verdict, when there is one.")
    comment: str | None = Field(None, max_length=MAX_COMMENT)
    source: Literal["human", "sdk", "api"] = "human"
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Posting again with the same key returns the first score (no duplicate).",
    )


class ScoreOut(BaseModel):
    id: str
    trace_id: str
    name: str
    value: float | None
    label: str | None
    passed: bool | None
    comment: str | None
    source: str
    evaluator: str | None
    model: str | None
    details: dict[str, Any]
    created_at_ms: int
    created_by: str | None


def _principal(request: Request) -> str | None:
    p = getattr(request.state, "keel_principal", None)
    if p is None:
        return None
    return p.id if p.id in ("admin-env", "internal") else p.principal


def _trace_model(engine: Engine, trace_id: str) -> tuple[bool, str | None]:
    with engine.connect() as conn:
        row = conn.execute(select(traces.c.model).where(traces.c.id == trace_id)).first()
    return (row is not None, row.model if row is not None else None)


def record_feedback(
    engine: Engine, trace_id: str, fb: FeedbackIn, created_by: str | None, recorder: Any = None
) -> tuple[dict[str, Any], bool]:
    """Store one piece of feedback; (the score, whether it is new). NotFound for an
    unknown trace, InvalidRequest for an unusable body; nothing is written then."""
    if fb.score is None and fb.label is None:
        raise InvalidRequest("feedback needs a 'score' and/or a 'label'", param="score")
    if fb.score is not None and not math.isfinite(fb.score):
        raise InvalidRequest("'score' must be a finite number", param="score")
    found, model = _trace_model(engine, trace_id)
    if not found and recorder is not None:
        # Feedback often follows the call within milliseconds: the trace may still be
        # in this process's recorder queue.
        recorder.flush(2.0)
        found, model = _trace_model(engine, trace_id)
    if not found:
        raise NotFound(f"no trace with id '{trace_id}'", code="trace_not_found")
    key = f"feedback:{trace_id}:{fb.idempotency_key}" if fb.idempotency_key else None
    row = sc.NewScore(
        trace_id=trace_id,
        name=fb.name,
        source=fb.source,
        value=fb.score,
        label=fb.label,
        passed=fb.passed,
        comment=fb.comment,
        model=model,
        created_by=created_by,
        dedup_key=key,
    )
    with engine.begin() as conn:
        sid = sc.write_score(conn, row)
    if sid is None:
        assert key is not None
        existing = sc.get_by_dedup_key(engine, key)
        assert existing is not None
        return existing, False
    out = sc.get_score(engine, sid)
    assert out is not None
    return out, True


def _ms(value: str | None, name: str) -> int | None:
    from keel.tracing.api import parse_time

    return parse_time(value, name)


def make_router(engine: Engine, evals: EvalsSettings, recorder: Any = None) -> APIRouter:
    r = APIRouter(prefix="/api", tags=["evals"])

    @r.post(
        "/traces/{trace_id}/feedback",
        status_code=201,
        response_model=ScoreOut,
        summary="Rate a trace (score, label, comment) as a user or reviewer",
    )
    async def _feedback(
        trace_id: str, request: Request, response: Response, body: FeedbackIn = Body(...)
    ) -> dict[str, Any]:
        who = _principal(request)
        out, new = await run_in_threadpool(record_feedback, engine, trace_id, body, who, recorder)
        request.state.keel_audit = {"target": f"trace={trace_id}", "score": out["id"]}
        if not new:
            response.status_code = 200
        return out

    @r.get("/traces/{trace_id}/scores", summary="Scores of one trace (online, human, labels)")
    def _trace_scores(trace_id: str) -> dict[str, Any]:
        if not _trace_model(engine, trace_id)[0]:
            raise NotFound(f"no trace with id '{trace_id}'", code="trace_not_found")
        return {"data": sc.trace_scores(engine, trace_id)}

    @r.get("/evals/scores/timeseries", summary="One score's count, mean and pass rate over time")
    def _timeseries(
        name: str = Query(..., description="Score name."),
        step: str = Query("5m", description="Bucket size: 1m, 5m, 1h, 1d…"),
        since: str = Query("24h", description="ISO 8601, epoch ms, or an age (24h, 7d)."),
        until: str | None = Query(None, description="Same forms; default now."),
        model: str | None = None,
        source: str | None = None,
    ) -> dict[str, Any]:
        try:
            step_ms = int(parse_duration(step) * 1000)
        except ValueError as e:
            raise InvalidRequest(f"step: {e}", param="step") from None
        lo = _ms(since, "since")
        hi = _ms(until, "until") or int(time.time() * 1000)
        assert lo is not None
        pts = sc.timeseries(
            engine, name, step_ms=step_ms, since_ms=lo, until_ms=hi, model=model, source=source
        )
        return {"name": name, "step_ms": step_ms, "data": pts}

    @r.get("/evals/scores", summary="Scores, newest first (filters, cursor pagination)")
    def _scores(
        name: str | None = None,
        source: str | None = Query(None, description="online, human, sdk, api or label."),
        model: str | None = None,
        trace_id: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = Query(100, description="1..1000."),
        cursor: str | None = None,
    ) -> dict[str, Any]:
        return sc.list_scores(
            engine,
            name=name,
            source=source,
            model=model,
            trace_id=trace_id,
            since_ms=_ms(since, "since"),
            until_ms=_ms(until, "until"),
            limit=limit,
            cursor=cursor,
        )

    @r.get("/evals/online", summary="Online evaluators: queue, today's budget use, last error")
    async def _online() -> dict[str, Any]:
        from keel.evals.online import status

        data = await asyncio.to_thread(status, engine, evals)
        return {"data": data}

    @r.get("/evals/agreement", summary="Agreement between an evaluator's and people's scores")
    def _agreement(
        evaluator: str = Query(..., description="Score name of the evaluator (or judge)."),
        human: str = Query(..., description="Score name of the human feedback."),
        evaluator_source: str | None = None,
        human_source: str | None = None,
        since: str | None = None,
        until: str | None = None,
        top: int = Query(10, ge=0, le=100, description="Biggest disagreements listed."),
    ) -> dict[str, Any]:
        return sc.agreement(
            engine,
            evaluator,
            human,
            evaluator_source=evaluator_source,
            human_source=human_source,
            since_ms=_ms(since, "since"),
            until_ms=_ms(until, "until"),
            top=top,
        )

    return r


__all__ = ["FeedbackIn", "make_router", "record_feedback"]
