"""A stored trace as an evaluation case, and an evaluator's score as a stored score.

Shared by the online worker and automatic labelling (``keel data from-traces
--label-with``).
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.engine import Engine

from keel.config.quality import OnlineEvaluatorSettings
from keel.evals.base import ChatResult, EvalCase, ModelClient, Score
from keel.evals.scores import NewScore
from keel.store.tables import traces
from keel.tracing.bodies import assistant_message, content_text, parse_body


def trace_case(row: Any) -> EvalCase | str:
    """The case an evaluator scores for a stored trace, or why there is none."""
    if row.request_body is None:
        return "the trace's request body was not captured (capture mode or capture_bodies)"
    req = parse_body(row.request_body)
    if not isinstance(req, dict) or req.get("_keel_truncated"):
        return "the trace's request body was truncated or is not JSON"
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        return "the trace's request has no chat messages"
    output = None
    if row.status == "ok":
        resp = parse_body(row.response_body)
        if row.response_body is None or not isinstance(resp, dict):
            return "the trace's response body was not captured"
        if resp.get("_keel_truncated"):
            return "the trace's response body was truncated in the store"
        msg = assistant_message(resp)
        output = content_text(msg["content"]) if msg else None
        if output is None and msg and msg.get("tool_calls"):
            output = orjson.dumps(msg["tool_calls"]).decode()
        if output is None:
            return "the trace's response has no assistant message"
    tags = parse_body(row.tags) if row.tags else {}
    return EvalCase(
        input=messages,
        output=output,
        metadata={
            "feature": row.feature,
            "user": row.user_id,
            "tags": tags or {},
            "status": row.status,
            "error": row.error_message,
        },
        latency_ms=row.duration_ms,
        cost_usd=row.cost_usd,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        trace_id=row.id,
        model=row.model,
    )


def load_traces(engine: Engine, ids: list[str]) -> dict[str, Any]:
    t = traces.c
    cols = (
        t.id, t.model, t.status, t.feature, t.user_id, t.tags, t.request_body, t.response_body,
        t.duration_ms, t.cost_usd, t.prompt_tokens, t.completion_tokens, t.error_message,
    )  # fmt: skip
    with engine.connect() as conn:
        return {r.id: r for r in conn.execute(select(*cols).where(t.id.in_(ids)))}


class FeatureClient:
    """A model client whose calls are all recorded under one feature (``keel:judge:<name>``),
    so a judge's spend can be read back per online evaluator."""

    def __init__(self, inner: ModelClient, feature: str) -> None:
        self.inner = inner
        self.feature = feature

    async def chat(self, body: dict[str, Any], *, feature: str | None = None) -> ChatResult:
        return await self.inner.chat(body, feature=self.feature)

    async def embed(self, texts: list[str], model: str, **_: Any) -> list[list[float]]:
        return await self.inner.embed(texts, model, feature=self.feature)  # type: ignore[call-arg]


def score_row(o: OnlineEvaluatorSettings, trace: Any, score: Score, source: str) -> NewScore:
    """The stored form of an evaluator's score on a trace."""
    details = dict(score.details)
    if score.reasoning:
        details["reasoning"] = score.reasoning
    if score.cost_usd:
        details["cost_usd"] = score.cost_usd
    return NewScore(
        trace_id=trace.id,
        name=o.name,
        source=source,
        value=score.value,
        label=score.label,
        passed=score.passed,
        evaluator=o.evaluator,
        details=details,
        model=trace.model,
        dedup_key=f"{source}:{trace.id}:{o.name}",
    )
