"""The Trace record: one per gateway call.

A ``TypedDict`` rather than a class: the request path builds one per call and
the batch writer hands the same dicts to SQLAlchemy's executemany, so there is
no conversion on either side.
"""

from __future__ import annotations

from typing import TypedDict


class TraceRecord(TypedDict, total=False):
    id: str  # UUIDv7 hex, sortable; also the X-Keel-Trace-Id header
    started_at_ms: int  # UTC epoch milliseconds
    duration_ms: float
    ttft_ms: float | None  # time to first token (streams)
    endpoint: str  # "chat" | "embeddings"
    model: str  # the alias the caller asked for
    provider: str | None
    upstream_model: str | None
    status: str  # "ok" | "error" | "cancelled"
    http_status: int
    error_type: str | None
    error_message: str | None
    stream: bool
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    tokens_estimated: bool
    user_id: str | None
    feature: str | None
    session_id: str | None
    tags: str | None  # JSON object text
    client_addr: str | None
    request_body: str | None  # JSON text, possibly truncated
    response_body: str | None  # JSON text (for streams: the assembled message)
    cost_usd: float | None
    api_key_id: str | None
    otel_trace_id: str | None
    otel_span_id: str | None  # the gateway call's own span
    otel_parent_span_id: str | None  # from the caller's W3C traceparent
    cached_tokens: int | None  # prompt tokens read from the provider's prompt cache
    cache_write_tokens: int | None  # prompt tokens written to it (Anthropic)
    reasoning_tokens: int | None  # part of completion_tokens
    cache_hit: bool | None  # answered from Keel's response cache
    prompt_version_id: str | None  # the prompt version the gateway rendered
    route_version: str | None  # registry "model@version" a deployment route sent it to


TRACE_FIELDS: tuple[str, ...] = tuple(TraceRecord.__annotations__)
