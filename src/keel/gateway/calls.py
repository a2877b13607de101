"""One gateway call: attribution, request checks, and the Trace it leaves behind."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.datastructures import Headers

from keel._ids import new_id
from keel.errors import InvalidRequest, KeelError
from keel.tracing.model import TraceRecord

_MAX_ATTR = 200
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def parse_traceparent(header: str | None) -> tuple[str, str] | None:
    """W3C ``traceparent`` → (trace id, parent span id); None when absent or invalid
    (the spec says an invalid header is ignored, not rejected)."""
    if not header:
        return None
    m = _TRACEPARENT.match(header.strip().lower())
    if not m or m.group(1) == "ff" or set(m.group(2)) == {"0"} or set(m.group(3)) == {"0"}:
        return None
    return m.group(2), m.group(3)


def _clip(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s[:_MAX_ATTR] or None


def parse_tags(header: str | None) -> dict[str, str]:
    """``k=v,k2=v2`` → dict; a malformed header is a 400, not silently ignored."""
    tags: dict[str, str] = {}
    if not header:
        return tags
    for part in header.split(","):
        part = part.strip()
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise InvalidRequest(
                f"X-Keel-Tags must look like 'key=value,key2=value2'; got {part!r}",
                param="X-Keel-Tags",
            )
        tags[k.strip()[:_MAX_ATTR]] = v.strip()[:_MAX_ATTR]
    return tags


@dataclass(slots=True)
class Attribution:
    user: str | None = None
    feature: str | None = None
    session: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    key_id: str | None = None  # the virtual key that made the call

    @classmethod
    def from_request(cls, headers: Headers, body: dict[str, Any]) -> Attribution:
        """Headers win over body fields (the platform sets headers, the app the body)."""
        meta = body.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise InvalidRequest("'metadata' must be an object of strings", param="metadata")
        meta = meta or {}
        tags = {
            str(k)[:_MAX_ATTR]: _clip(v) or ""
            for k, v in meta.items()
            if k not in ("user", "feature", "session", "session_id")
        }
        tags.update(parse_tags(headers.get("x-keel-tags")))
        return cls(
            user=_clip(headers.get("x-keel-user") or body.get("user") or meta.get("user")),
            feature=_clip(headers.get("x-keel-feature") or meta.get("feature")),
            session=_clip(
                headers.get("x-keel-session") or meta.get("session") or meta.get("session_id")
            ),
            tags=tags,
        )


def estimate_tokens(text: str) -> int:
    """A rough count (≈ 4 characters a token for English) when the upstream reports none.

    Traces carry ``tokens_estimated = true`` whenever this was used.
    """
    return max(1, (len(text) + 3) // 4) if text else 0


def messages_text(messages: list[Any]) -> str:
    parts: list[str] = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        c = m.get("content")
        if isinstance(c, str):
            parts.append(c)
        elif isinstance(c, list):
            parts.extend(p.get("text", "") for p in c if isinstance(p, dict))
    return "\n".join(parts)


def check_chat_body(body: Any) -> None:
    """The few fields the gateway itself relies on; the upstream checks the rest."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a non-empty string", param="model")
    msgs = body.get("messages")
    if msgs is None:
        raise InvalidRequest("'messages' is required", param="messages")
    if not isinstance(msgs, list) or not msgs:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(
                f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]"
            )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options")


def check_embeddings_body(body: Any) -> None:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a non-empty string", param="model")
    inp = body.get("input")
    ok = isinstance(inp, str) or (
        isinstance(inp, list)
        and inp
        and (
            all(isinstance(x, str) for x in inp)
            or all(isinstance(x, int) for x in inp)
            or all(isinstance(x, list) and all(isinstance(y, int) for y in x) for x in inp)
        )
    )
    if not ok:
        raise InvalidRequest(
            "'input' must be a string, an array of strings, or token arrays (non-empty)",
            param="input",
        )


@dataclass(slots=True)
class Call:
    """Timing and identity of one call, created when the request arrives."""

    endpoint: str
    client_addr: str | None
    id: str = field(default_factory=new_id)
    started_at_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)
    t0: float = field(default_factory=time.perf_counter)
    ttft_ms: float | None = None
    otel_trace_id: str | None = None
    otel_parent_span_id: str | None = None
    otel_span_id: str | None = None
    admission: Any = None  # from the limits, settled when the trace is recorded
    cache_hit: bool | None = None
    prompt_version_id: str | None = None

    def join_trace(self, traceparent: str | None) -> None:
        """Make this call a span of the caller's OpenTelemetry trace, if it sent one."""
        parsed = parse_traceparent(traceparent)
        if parsed is not None:
            self.otel_trace_id, self.otel_parent_span_id = parsed
            self.otel_span_id = os.urandom(8).hex()

    def mark_first_token(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.t0) * 1000.0

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000.0


def clip_body(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    # Keep it valid JSON so the store and the UI can still parse it.
    return orjson.dumps(
        {"_keel_truncated": True, "length": len(text), "head": text[:limit]}
    ).decode()


def make_trace(
    call: Call,
    *,
    model: str,
    provider: str | None,
    upstream_model: str | None,
    attribution: Attribution,
    stream: bool,
    http_status: int,
    request_body: str | None,
    response_body: str | None,
    usage: dict[str, Any] | None,
    error: KeelError | None = None,
    status: str | None = None,
    estimated_tokens: tuple[int, int] | None = None,
    route_version: str | None = None,
) -> TraceRecord:
    pt = ct = tt = None
    cached = cache_write = reasoning = None
    estimated = False
    if usage:
        pt = usage.get("prompt_tokens")
        ct = usage.get("completion_tokens")
        tt = usage.get("total_tokens")
        if tt is None and pt is not None:
            tt = pt + (ct or 0)
        cached, cache_write, reasoning = usage_details(usage)
    elif estimated_tokens is not None:
        pt, ct = estimated_tokens
        tt = pt + ct
        estimated = True
    return {
        "id": call.id,
        "started_at_ms": call.started_at_ms,
        "duration_ms": call.elapsed_ms(),
        "ttft_ms": call.ttft_ms,
        "endpoint": call.endpoint,
        "model": model,
        "provider": provider,
        "upstream_model": upstream_model,
        "status": status or ("error" if error is not None else "ok"),
        "http_status": http_status,
        "error_type": error.type if error is not None else None,
        "error_message": error.message[:4000] if error is not None else None,
        "stream": stream,
        "prompt_tokens": pt,
        "completion_tokens": ct,
        "total_tokens": tt,
        "tokens_estimated": estimated,
        "user_id": attribution.user,
        "feature": attribution.feature,
        "session_id": attribution.session,
        "tags": orjson.dumps(attribution.tags).decode() if attribution.tags else None,
        "client_addr": call.client_addr,
        "api_key_id": attribution.key_id,
        "request_body": request_body,
        "response_body": response_body,
        "otel_trace_id": call.otel_trace_id,
        "otel_span_id": call.otel_span_id,
        "otel_parent_span_id": call.otel_parent_span_id,
        "cached_tokens": cached,
        "cache_write_tokens": cache_write,
        "reasoning_tokens": reasoning,
        "cache_hit": call.cache_hit,
        "prompt_version_id": call.prompt_version_id,
        "route_version": route_version,
    }


def usage_details(usage: dict[str, Any]) -> tuple[int | None, int | None, int | None]:
    """(cached prompt tokens, cache-write tokens, reasoning tokens) from a usage object.

    OpenAI reports ``prompt_tokens_details.cached_tokens`` and
    ``completion_tokens_details.reasoning_tokens``; the Anthropic adapter adds
    the Messages API's own numbers under ``usage["anthropic"]``.
    """
    ptd = usage.get("prompt_tokens_details") or {}
    ctd = usage.get("completion_tokens_details") or {}
    anth = usage.get("anthropic") or {}
    cached = ptd.get("cached_tokens") if isinstance(ptd, dict) else None
    if cached is None and isinstance(anth, dict):
        cached = anth.get("cache_read_input_tokens")
    write = anth.get("cache_creation_input_tokens") if isinstance(anth, dict) else None
    reasoning = ctd.get("reasoning_tokens") if isinstance(ctd, dict) else None
    return (
        cached if isinstance(cached, int) else None,
        write if isinstance(write, int) else None,
        reasoning if isinstance(reasoning, int) else None,
    )
