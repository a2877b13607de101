"""REST: ``GET /api/traces`` (filters, cursor pagination) and ``GET /api/traces/{id}``."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy import and_, or_, select
from sqlalchemy.engine import Engine

from keel.errors import InvalidRequest, NotFound
from keel.store.tables import traces

_SUMMARY_COLS = [c for c in traces.columns if c.name not in ("request_body", "response_body")]
_REL = re.compile(r"^(\d+)\s*(s|m|h|d|w)$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class TraceSummary(BaseModel):
    id: str
    started_at: datetime
    duration_ms: float
    ttft_ms: float | None = None
    endpoint: str
    model: str
    provider: str | None = None
    upstream_model: str | None = None
    status: Literal["ok", "error", "cancelled"]
    http_status: int
    error_type: str | None = None
    error_message: str | None = None
    stream: bool
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    tokens_estimated: bool
    user: str | None = None
    feature: str | None = None
    session: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    client_addr: str | None = None
    cost_usd: float | None = None


class TraceDetail(TraceSummary):
    request: Any = Field(None, description="The request body as received (JSON).")
    response: Any = Field(None, description="The response body (streams: the assembled message).")
    tree: dict[str, Any] | None = Field(
        None,
        description="When the call was part of an application's OpenTelemetry trace: the "
        "whole trace (gateway calls and application spans), nested and as a waterfall.",
    )
    scores: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Scores of the call: online evaluators, judges, human feedback.",
    )


class TracePage(BaseModel):
    data: list[TraceSummary]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page.")


def parse_time(value: str | None, name: str) -> int | None:
    """ISO 8601, epoch milliseconds, or a relative age like ``15m``, ``24h``, ``7d``."""
    if value is None or value == "":
        return None
    v = value.strip()
    if m := _REL.match(v):
        delta = timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        return int((datetime.now(UTC) - delta).timestamp() * 1000)
    if v.isdigit():
        return int(v)
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(
            f"'{name}' must be ISO 8601 (2026-01-31T12:00:00Z), epoch ms, or an age (15m, 7d);"
            f" got {value!r}",
            param=name,
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _encode_cursor(ms: int, tid: str) -> str:
    return base64.urlsafe_b64encode(f"{ms}:{tid}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ms, tid = raw.split(":", 1)
        return int(ms), tid
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest(
            "'cursor' is not a cursor returned by this API", param="cursor"
        ) from None


def _row_to_summary(row: Any) -> dict[str, Any]:
    m = row._mapping
    return {
        "id": m["id"],
        "started_at": datetime.fromtimestamp(m["started_at_ms"] / 1000, UTC),
        "duration_ms": m["duration_ms"],
        "ttft_ms": m["ttft_ms"],
        "endpoint": m["endpoint"],
        "model": m["model"],
        "provider": m["provider"],
        "upstream_model": m["upstream_model"],
        "status": m["status"],
        "http_status": m["http_status"],
        "error_type": m["error_type"],
        "error_message": m["error_message"],
        "stream": bool(m["stream"]),
        "prompt_tokens": m["prompt_tokens"],
        "completion_tokens": m["completion_tokens"],
        "total_tokens": m["total_tokens"],
        "tokens_estimated": bool(m["tokens_estimated"]),
        "user": m["user_id"],
        "feature": m["feature"],
        "session": m["session_id"],
        "tags": orjson.loads(m["tags"]) if m["tags"] else {},
        "client_addr": m["client_addr"],
        "cost_usd": m["cost_usd"],
    }


def _load_json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def list_traces(
    engine: Engine,
    *,
    model: str | None = None,
    status: str | None = None,
    user: str | None = None,
    feature: str | None = None,
    session: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Newest first. Raises InvalidRequest on a bad filter value."""
    if not 1 <= limit <= 1000:
        raise InvalidRequest("'limit' must be between 1 and 1000", param="limit")
    if status is not None and status not in ("ok", "error", "cancelled"):
        raise InvalidRequest("'status' must be one of ok, error, cancelled", param="status")
    conds = []
    for col, val in (
        ("model", model),
        ("status", status),
        ("user_id", user),
        ("feature", feature),
        ("session_id", session),
    ):
        if val is not None:
            conds.append(traces.c[col] == val)
    if (lo := parse_time(since, "since")) is not None:
        conds.append(traces.c.started_at_ms >= lo)
    if (hi := parse_time(until, "until")) is not None:
        conds.append(traces.c.started_at_ms < hi)
    if cursor:
        c_ms, c_id = _decode_cursor(cursor)
        conds.append(
            or_(
                traces.c.started_at_ms < c_ms,
                and_(traces.c.started_at_ms == c_ms, traces.c.id < c_id),
            )
        )
    q = (
        select(*_SUMMARY_COLS)
        .where(and_(True, *conds))
        .order_by(traces.c.started_at_ms.desc(), traces.c.id.desc())
        .limit(limit + 1)
    )
    with engine.connect() as conn:
        rows = conn.execute(q).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    data = [_row_to_summary(r) for r in rows]
    nxt = _encode_cursor(rows[-1].started_at_ms, rows[-1].id) if more and rows else None
    return {"data": data, "next_cursor": nxt}


def get_trace(engine: Engine, trace_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(select(traces).where(traces.c.id == trace_id)).first()
    if row is None:
        raise NotFound(f"no trace with id '{trace_id}'", code="trace_not_found")
    out = _row_to_summary(row)
    out["request"] = _load_json(row.request_body)
    out["response"] = _load_json(row.response_body)
    if row.otel_trace_id:
        from keel.tracing.tree import trace_tree

        out["tree"] = trace_tree(engine, trace_id)
    from keel.evals.scores import trace_scores

    out["scores"] = trace_scores(engine, trace_id)
    return out


def make_router(engine: Engine) -> APIRouter:
    r = APIRouter(prefix="/api/traces", tags=["traces"])

    @r.get("", response_model=TracePage, summary="List traces, newest first")
    def _list(
        model: str | None = Query(None, description="Model alias."),
        status: str | None = Query(None, description="ok, error or cancelled."),
        user: str | None = None,
        feature: str | None = None,
        session: str | None = None,
        since: str | None = Query(None, description="ISO 8601, epoch ms, or an age: 15m, 24h, 7d."),
        until: str | None = Query(None, description="Same forms as `since`; exclusive."),
        limit: int = Query(50, description="1..1000."),
        cursor: str | None = Query(None, description="`next_cursor` of the previous page."),
    ) -> dict[str, Any]:
        return list_traces(
            engine,
            model=model,
            status=status,
            user=user,
            feature=feature,
            session=session,
            since=since,
            until=until,
            limit=limit,
            cursor=cursor,
        )

    @r.get("/{trace_id}", response_model=TraceDetail, summary="One trace with its bodies")
    def _get(trace_id: str) -> dict[str, Any]:
        return get_trace(engine, trace_id)

    return r
