"""Streaming chat completions: the upstream stream relay and the cached-stream replay."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from keel.errors import KeelError, UpstreamError
from keel.gateway.calls import Call, clip_body, estimate_tokens, messages_text

log = logging.getLogger("keel.gateway")


async def relay(
    call: Call,
    agen: AsyncIterator[tuple[bytes, dict[str, Any]]],
    first: tuple[bytes, dict[str, Any]] | None,
    messages: list[Any],
    common: dict[str, Any],
    client_wants_usage: bool,
    gauge: Any = None,
    *,
    record: Callable[..., Any],
    request_body: str | None,
    capture: bool,
    max_chars: int,
) -> AsyncIterator[bytes]:
    """Relay an upstream stream to the client as SSE, then record the call.

    The trace is recorded (through ``record``, the gateway's recorder hook) however
    the stream ends: finished, failed upstream, or the client went away. ``gauge``,
    if any, is the in-flight gauge to decrement when it ends. ``request_body`` is the
    request as captured; ``capture``/``max_chars`` say whether and how much of the
    response to keep.
    """
    content: list[str] = []
    tool_calls: dict[int, dict[str, Any]] = {}
    finish = None
    role = "assistant"
    usage: dict[str, Any] | None = None
    error: KeelError | None = None
    status = "ok"
    try:
        item = first
        while item is not None:
            data, chunk = item
            choices = chunk.get("choices") or []
            if chunk.get("usage"):
                usage = chunk["usage"]
            for ch in choices:
                delta = ch.get("delta") or {}
                if delta.get("content"):
                    call.mark_first_token()
                    content.append(delta["content"])
                for tc in delta.get("tool_calls") or ():
                    call.mark_first_token()
                    _merge_tool_call(tool_calls, tc)
                if delta.get("role"):
                    role = delta["role"]
                if ch.get("finish_reason"):
                    finish = ch["finish_reason"]
            if choices or client_wants_usage:
                yield b"data: " + data + b"\n\n"
            try:
                item = await agen.__anext__()
            except StopAsyncIteration:
                item = None
        yield b"data: [DONE]\n\n"
    except KeelError as e:
        error = e
        status = "error"
        yield b"data: " + orjson.dumps(e.to_body()) + b"\n\n"
    except Exception as e:  # a bug in an adapter: tell the client, keep serving
        log.exception("stream relay failed")
        status = "error"
        error = UpstreamError(f"stream relay failed: {e}", code="relay_error")
        yield b"data: " + orjson.dumps(error.to_body()) + b"\n\n"
    except BaseException:  # GeneratorExit / CancelledError: the client went away
        status = "cancelled"
        error = UpstreamError(
            "the client disconnected before the stream ended", status=499, code="client_closed"
        )
        raise
    finally:
        if gauge is not None:
            gauge.dec()
        await agen.aclose()
        message: dict[str, Any] = {"role": role, "content": "".join(content)}
        if tool_calls:
            message["tool_calls"] = [tool_calls[i] for i in sorted(tool_calls)]
        resp_text = None
        if capture:
            resp_text = clip_body(
                orjson.dumps({"message": message, "finish_reason": finish}).decode(),
                max_chars,
            )
        est = None
        if usage is None:
            est = (
                estimate_tokens(messages_text(messages)),
                estimate_tokens(message["content"]),
            )
        record(
            call=call,
            stream=True,
            http_status=error.status if error and status == "error" else 200,
            request_body=request_body,
            response_body=resp_text,
            usage=usage,
            estimated_tokens=est,
            error=error,
            status=status,
            **common,
        )


async def replay_sse(resp: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    """A cached chat.completion, sent as the stream a client asked for."""
    base = {
        "id": resp.get("id"),
        "object": "chat.completion.chunk",
        "created": resp.get("created"),
        "model": resp.get("model"),
    }
    for i, ch in enumerate(resp.get("choices") or []):
        msg = ch.get("message") or {}
        delta = {"role": msg.get("role", "assistant"), "content": msg.get("content") or ""}
        if msg.get("tool_calls"):
            delta["tool_calls"] = [{**tc, "index": j} for j, tc in enumerate(msg["tool_calls"])]
        yield (
            b"data: "
            + orjson.dumps(
                {
                    **base,
                    "choices": [
                        {"index": ch.get("index", i), "delta": delta, "finish_reason": None}
                    ],
                }
            )
            + b"\n\n"
        )
        yield (
            b"data: "
            + orjson.dumps(
                {
                    **base,
                    "choices": [
                        {
                            "index": ch.get("index", i),
                            "delta": {},
                            "finish_reason": ch.get("finish_reason", "stop"),
                        }
                    ],
                }
            )
            + b"\n\n"
        )
    if include_usage and resp.get("usage"):
        yield b"data: " + orjson.dumps({**base, "choices": [], "usage": resp["usage"]}) + b"\n\n"
    yield b"data: [DONE]\n\n"


def choice_text(resp: dict[str, Any]) -> str:
    try:
        return "".join((c.get("message") or {}).get("content") or "" for c in resp["choices"])
    except (KeyError, TypeError, AttributeError):
        return ""


def _merge_tool_call(acc: dict[int, dict[str, Any]], tc: dict[str, Any]) -> None:
    i = tc.get("index", 0)
    cur = acc.setdefault(
        i, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
    )
    if tc.get("id"):
        cur["id"] = tc["id"]
    fn = tc.get("function") or {}
    if fn.get("name"):
        cur["function"]["name"] += fn["name"]
    if fn.get("arguments"):
        cur["function"]["arguments"] += fn["arguments"]
