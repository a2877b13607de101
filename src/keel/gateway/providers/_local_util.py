"""Request checking and response building for :mod:`keel.gateway.providers.local`.

Pure functions, no model: they validate an OpenAI-style request body (raising
:class:`~keel.errors.InvalidRequest` or :class:`~keel.errors.UpstreamError` as
OpenAI would answer) and shape what the embedded models return into OpenAI's
chat completion, chunk and embeddings objects.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson

from keel._ids import new_id
from keel.errors import InvalidRequest, UpstreamError
from keel.gateway.providers.base import ChatChunk

CHAT_MODEL = "local"
EMBED_MODEL = "local-embed"
EMBED_DIMENSIONS = 384
#: OpenAI's own limit on inputs per embeddings request.
MAX_EMBED_INPUTS = 2048

_ROLES = {"system", "user", "assistant", "tool", "developer"}


def _check_model(body: dict[str, Any], expected: str, what: str) -> None:
    model = body.get("model")
    if model != expected:
        raise UpstreamError(
            f"The local provider has no {what} model '{model}': it serves "
            f"'{CHAT_MODEL}' (chat) and '{EMBED_MODEL}' (embeddings)",
            status=404,
            code="model_not_found",
        )


def _number(body: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise InvalidRequest(f"'{key}' must be a number from {lo:g} to {hi:g}", param=key)
    return float(v)


def _integer(body: dict[str, Any], key: str, lo: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise InvalidRequest(f"'{key}' must be an integer >= {lo}", param=key)
    return v


def _content_text(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                raise InvalidRequest(
                    f"messages[{i}].content: the local model reads text parts only",
                    param="messages",
                )
        return "".join(parts)
    raise InvalidRequest(
        f"messages[{i}].content must be a string or a list of parts", param="messages"
    )


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise InvalidRequest(
                f"messages[{i}] must be an object with a role among {', '.join(sorted(_ROLES))}",
                param="messages",
            )
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content_text(m.get("content"), i)})
    return out


def _params(body: dict[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """llama.cpp ``create_chat_completion`` keywords from a chat request body."""
    kw: dict[str, Any] = {"messages": _messages(body)}
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    kw["max_tokens"] = max_tokens or default_max_tokens
    for key, lo, hi in (
        ("temperature", 0.0, 2.0),
        ("top_p", 0.0, 1.0),
        ("presence_penalty", -2.0, 2.0),
        ("frequency_penalty", -2.0, 2.0),
    ):
        v = _number(body, key, lo, hi)
        if v is not None:
            kw[key] = v
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidRequest("'seed' must be an integer", param="seed")
        kw["seed"] = seed & 0xFFFFFFFF
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("'stop' must be a string or a list of strings", param="stop")
        kw["stop"] = [s for s in stop if s]
    return kw


def _chat_response(result: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat completion from llama.cpp's non-streamed result."""
    choice = result["choices"][0]
    usage = result["usage"]
    return {
        "id": f"chatcmpl-{new_id()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": CHAT_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": choice["message"]["content"]},
                "logprobs": None,
                "finish_reason": choice["finish_reason"],
            }
        ],
        "usage": {
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"],
        },
    }


def _chunk(
    cid: str,
    created: int,
    include_usage: bool,
    delta: dict[str, Any],
    finish: str | None = None,
) -> ChatChunk:
    """One streamed chat chunk carrying ``delta``."""
    c: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": CHAT_MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if include_usage:
        c["usage"] = None
    return orjson.dumps(c), c


def _usage_chunk(cid: str, created: int, prompt: int, completion: int) -> ChatChunk:
    """The final streamed chunk with the usage (``stream_options.include_usage``)."""
    c = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": CHAT_MODEL,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
    return orjson.dumps(c), c


def _embed_request(body: dict[str, Any]) -> tuple[list[str], str]:
    """(texts, encoding format) of an embeddings request, checked."""
    raw = body.get("input")
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list):
        if not raw:
            raise InvalidRequest("'input' must not be an empty list", param="input")
        if not all(isinstance(t, str) for t in raw):
            raise InvalidRequest(
                f"'{EMBED_MODEL}' embeds text: 'input' must be a string or a list of "
                "strings (token arrays are not supported)",
                param="input",
            )
        if len(raw) > MAX_EMBED_INPUTS:
            raise InvalidRequest(
                f"'input' holds {len(raw)} items; at most {MAX_EMBED_INPUTS} per request",
                param="input",
            )
        texts = raw
    else:
        raise InvalidRequest("'input' must be a string or a list of strings", param="input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise InvalidRequest(
            "'encoding_format' must be 'float' or 'base64'", param="encoding_format"
        )
    dims = body.get("dimensions")
    if dims is not None and dims != EMBED_DIMENSIONS:
        raise InvalidRequest(
            f"'{EMBED_MODEL}' has {EMBED_DIMENSIONS} dimensions; 'dimensions' cannot change it",
            param="dimensions",
        )
    return texts, fmt


def _embed_response(vectors: Any, n_tokens: int, fmt: str) -> dict[str, Any]:
    """An OpenAI embeddings list from the encoder's (n, 384) float32 array."""
    if fmt == "base64":
        # As OpenAI: the raw little-endian float32 bytes, base64-encoded.
        le = vectors.astype("<f4", copy=False)
        values: list[Any] = [base64.b64encode(v.tobytes()).decode("ascii") for v in le]
    else:
        values = vectors.tolist()
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(values)],
        "model": EMBED_MODEL,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }
