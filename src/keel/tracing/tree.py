"""One trace as a tree: the gateway calls that joined it and the application's spans.

A gateway call made with a W3C ``traceparent`` carries the caller's trace id,
its own span id and its parent (``traces.otel_*``); it is shown as a span of
kind ``llm`` (chat) or ``embedding`` next to the spans the application sent
over OTLP, nested under the application span that made the call.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.engine import Engine

from keel.errors import NotFound
from keel.store.tables import spans, traces

MAX_SPANS = 10_000
_HEX32 = re.compile(r"[0-9a-f]{32}")
_GATEWAY_COLS = (
    traces.c.id,
    traces.c.started_at_ms,
    traces.c.duration_ms,
    traces.c.endpoint,
    traces.c.model,
    traces.c.provider,
    traces.c.upstream_model,
    traces.c.status,
    traces.c.http_status,
    traces.c.error_message,
    traces.c.prompt_tokens,
    traces.c.completion_tokens,
    traces.c.cost_usd,
    traces.c.otel_trace_id,
    traces.c.otel_span_id,
    traces.c.otel_parent_span_id,
)


def _json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _gateway_node(m: Any) -> dict[str, Any]:
    start_us = int(m["started_at_ms"]) * 1000
    dur = float(m["duration_ms"] or 0.0)
    status = m["status"]
    return {
        "span_id": m["otel_span_id"] or m["id"][-16:],
        "parent_span_id": m["otel_parent_span_id"],
        "name": f"keel.gateway {m['endpoint']}",
        "kind": "embedding" if m["endpoint"] == "embeddings" else "llm",
        "source": "gateway",
        "service": "keel",
        "start_us": start_us,
        "end_us": start_us + int(dur * 1000),
        "duration_ms": dur,
        "status": "ok" if status == "ok" else "error",
        "status_message": m["error_message"] or (status if status != "ok" else None),
        "model": m["model"],
        "prompt_tokens": m["prompt_tokens"],
        "completion_tokens": m["completion_tokens"],
        "input": None,
        "output": None,
        "result_count": None,
        "top_score": None,
        "attributes": {
            "keel.provider": m["provider"],
            "keel.upstream_model": m["upstream_model"],
            "http.response.status_code": m["http_status"],
            "keel.cost_usd": m["cost_usd"],
        },
        "events": None,
        "keel_trace_id": m["id"],
    }


def _span_node(m: Any) -> dict[str, Any]:
    return {
        "span_id": m["span_id"],
        "parent_span_id": m["parent_span_id"],
        "name": m["name"],
        "kind": m["kind"],
        "source": "app",
        "service": m["service"],
        "start_us": m["start_us"],
        "end_us": m["end_us"],
        "duration_ms": m["duration_ms"],
        "status": m["status"],
        "status_message": m["status_message"],
        "model": m["model"],
        "prompt_tokens": m["prompt_tokens"],
        "completion_tokens": m["completion_tokens"],
        "input": m["input"],
        "output": m["output"],
        "result_count": m["result_count"],
        "top_score": m["top_score"],
        "attributes": _json(m["attributes"]) or {},
        "events": _json(m["events"]),
        "keel_trace_id": None,
    }


def trace_tree(engine: Engine, trace_id: str) -> dict[str, Any]:
    """The tree of a trace, by Keel trace id (``traces.id``) or OpenTelemetry trace id.

    Returns ``{"otel_trace_id", "keel_trace_ids", "start_us", "duration_ms",
    "span_count", "truncated", "spans", "waterfall"}``: ``spans`` holds the
    roots (spans whose parent is absent), each node with ``depth`` and its
    ``children`` ordered by start; ``waterfall`` is the same tree flattened
    depth-first, one compact row per span (``offset_ms`` from the trace start),
    for a timeline. Raises NotFound when nothing matches.
    """
    tid = trace_id.strip()
    with engine.connect() as conn:
        own = conn.execute(select(*_GATEWAY_COLS).where(traces.c.id == tid)).first()
        otel = own.otel_trace_id if own is not None else None
        if own is None and _HEX32.fullmatch(tid.lower()):
            otel = tid.lower()
        gw_rows: list[Any] = []
        span_rows: list[Any] = []
        if otel is not None:
            gw_rows = conn.execute(
                select(*_GATEWAY_COLS)
                .where(traces.c.otel_trace_id == otel)
                .order_by(traces.c.started_at_ms)
                .limit(MAX_SPANS)
            ).fetchall()
            span_rows = conn.execute(
                select(spans)
                .where(spans.c.trace_id == otel)
                .order_by(spans.c.start_us)
                .limit(MAX_SPANS + 1)
            ).fetchall()
        elif own is not None:
            gw_rows = [own]
    if not gw_rows and not span_rows:
        raise NotFound(f"no trace with id '{trace_id}'", code="trace_not_found")
    truncated = len(span_rows) > MAX_SPANS
    nodes = [_span_node(r._mapping) for r in span_rows[:MAX_SPANS]]
    seen = {n["span_id"] for n in nodes}
    # A gateway call is a span of its own; if an app also exported one with the
    # same id (unlikely), the app's copy wins.
    nodes += [g for r in gw_rows if (g := _gateway_node(r._mapping))["span_id"] not in seen]
    return build_tree(nodes, otel, [r.id for r in gw_rows], truncated)


def build_tree(
    nodes: list[dict[str, Any]],
    otel_trace_id: str | None,
    keel_trace_ids: list[str],
    truncated: bool = False,
) -> dict[str, Any]:
    """Nest ``nodes`` by ``parent_span_id``; parents missing from the trace make roots."""
    nodes.sort(key=lambda n: (n["start_us"], n["end_us"]))
    by_id: dict[str, dict[str, Any]] = {}
    for n in nodes:
        n["children"] = []
        by_id.setdefault(n["span_id"], n)
    roots: list[dict[str, Any]] = []
    for n in nodes:
        p = by_id.get(n["parent_span_id"] or "")
        if p is None or p is n:
            roots.append(n)
        else:
            p["children"].append(n)
    start = min((n["start_us"] for n in nodes), default=0)
    end = max((n["end_us"] for n in nodes), default=0)
    waterfall: list[dict[str, Any]] = []
    visited: set[int] = set()

    def walk(top: list[dict[str, Any]]) -> None:
        stack = [(n, 0) for n in reversed(top)]
        while stack:
            n, depth = stack.pop()
            if id(n) in visited:
                continue
            visited.add(id(n))
            n["depth"] = depth
            waterfall.append(
                {
                    "span_id": n["span_id"],
                    "parent_span_id": n["parent_span_id"],
                    "name": n["name"],
                    "kind": n["kind"],
                    "source": n["source"],
                    "status": n["status"],
                    "depth": depth,
                    "offset_ms": (n["start_us"] - start) / 1000,
                    "duration_ms": n["duration_ms"],
                }
            )
            stack.extend((c, depth + 1) for c in reversed(n["children"]))

    walk(roots)
    # Spans caught in a parent cycle are unreachable from any root: show them as roots.
    for n in nodes:
        if id(n) not in visited:
            for p in nodes:
                if id(p) not in visited:
                    p["children"] = [c for c in p["children"] if c is not n]
            roots.append(n)
            walk([n])
    return {
        "otel_trace_id": otel_trace_id,
        "keel_trace_ids": keel_trace_ids,
        "start_us": start,
        "duration_ms": (end - start) / 1000,
        "span_count": len(nodes),
        "truncated": truncated,
        "spans": roots,
        "waterfall": waterfall,
    }
