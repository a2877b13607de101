"""Anthropic's Messages API, behind the OpenAI chat.completions shape.

The gateway speaks OpenAI; this adapter translates a ``chat.completions``
request into a ``POST /v1/messages`` call and the answer (or its SSE stream)
back into ``chat.completion`` / ``chat.completion.chunk`` dicts. The pure
translation functions (:func:`to_anthropic`, :func:`from_anthropic`,
:class:`StreamTranslator`) hold all the mapping, so it can be tested without a
network.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from keel.errors import InvalidRequest, UpstreamError
from keel.gateway.providers._http import open_stream, post_json, sse_data
from keel.gateway.providers.base import ChatChunk, Provider, register

DEFAULT_BASE_URL = "https://api.anthropic.com"
#: Anthropic requires max_tokens; OpenAI callers often leave it out.
DEFAULT_MAX_TOKENS = 4096

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# -- request: OpenAI → Anthropic ---------------------------------------------


def _image_block(part: dict[str, Any], where: str) -> dict[str, Any]:
    img = part.get("image_url")
    url = img.get("url") if isinstance(img, dict) else img
    if not isinstance(url, str) or not url:
        raise InvalidRequest(f"{where}: image_url part has no url", param="messages")
    if url.startswith("data:"):
        header, sep, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not sep or encoding != "base64" or not media_type:
            raise InvalidRequest(
                f"{where}: a data: image URL must look like data:<media type>;base64,<data>",
                param="messages",
            )
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise InvalidRequest(
        f"{where}: image URL must be an http(s) URL or a base64 data: URL", param="messages"
    )


def _content_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI message content (string, parts or None) → Anthropic content blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        # Anthropic rejects empty text blocks.
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise InvalidRequest(
            f"{where}: 'content' must be a string or a list of content parts", param="messages"
        )
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        pwhere = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise InvalidRequest(f"{pwhere}: a content part must be an object", param="messages")
        ptype = part.get("type")
        if ptype in ("text", "refusal"):
            text = part.get(ptype)
            if not isinstance(text, str):
                raise InvalidRequest(f"{pwhere}: '{ptype}' must be a string", param="messages")
            if not text:
                continue
            block: dict[str, Any] = {"type": "text", "text": text}
        elif ptype == "image_url":
            block = _image_block(part, pwhere)
        else:
            raise InvalidRequest(
                f"{pwhere}: content part type {ptype!r} is not supported by Anthropic models "
                "(use 'text' or 'image_url')",
                param="messages",
            )
        # Prompt caching: a caller may mark parts the Anthropic way.
        if isinstance(part.get("cache_control"), dict):
            block["cache_control"] = part["cache_control"]
        blocks.append(block)
    return blocks


def _text_only(content: Any, where: str) -> str:
    blocks = _content_blocks(content, where)
    if any(b["type"] != "text" for b in blocks):
        raise InvalidRequest(f"{where}: only text content is allowed here", param="messages")
    return "\n".join(b["text"] for b in blocks)


def _tool_use_blocks(tool_calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(tool_calls, list):
        raise InvalidRequest(f"{where}: 'tool_calls' must be a list", param="messages")
    blocks = []
    for j, call in enumerate(tool_calls):
        cwhere = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not call.get("id") or not fn.get("name"):
            raise InvalidRequest(
                f"{cwhere}: a tool call needs an 'id' and a 'function' with a 'name'",
                param="messages",
            )
        args = fn.get("arguments")
        if isinstance(args, dict):
            parsed: Any = args
        elif args is None or args == "":
            parsed = {}
        else:
            try:
                parsed = orjson.loads(args)
            except (orjson.JSONDecodeError, TypeError) as e:
                raise InvalidRequest(
                    f"{cwhere}: function.arguments is not valid JSON", param="messages"
                ) from e
        if not isinstance(parsed, dict):
            raise InvalidRequest(
                f"{cwhere}: function.arguments must be a JSON object", param="messages"
            )
        blocks.append(
            {"type": "tool_use", "id": str(call["id"]), "name": str(fn["name"]), "input": parsed}
        )
    return blocks


def _translate_messages(messages: Any) -> tuple[str | None, list[dict[str, Any]]]:
    if not isinstance(messages, list):
        raise InvalidRequest("'messages' must be a list of messages", param="messages")
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"{where}: a message must be an object", param="messages")
        role = m.get("role")
        if role is None:
            raise InvalidRequest(f"{where}: the message has no 'role'", param="messages")
        if role in ("system", "developer"):
            text = _text_only(m.get("content"), where)
            if text:
                system.append(text)
            continue
        if role == "user":
            blocks = _content_blocks(m.get("content"), where)
        elif role == "assistant":
            blocks = _content_blocks(m.get("content"), where)
            if m.get("tool_calls"):
                blocks += _tool_use_blocks(m["tool_calls"], where)
        elif role == "tool":
            if not m.get("tool_call_id"):
                raise InvalidRequest(
                    f"{where}: a tool message needs 'tool_call_id'", param="messages"
                )
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": str(m["tool_call_id"])}
            text = _text_only(m.get("content"), where)
            if text:
                result["content"] = text
            role, blocks = "user", [result]
        else:
            raise InvalidRequest(
                f"{where}: role {role!r} is not supported "
                "(use system, developer, user, assistant or tool)",
                param="messages",
            )
        if not blocks:
            continue
        # Anthropic requires user/assistant to alternate: merge runs of one role.
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    for msg in out:
        # Tool results must come first in a user message, before any text.
        msg["content"].sort(key=lambda b: b["type"] != "tool_result")
    return ("\n\n".join(system) or None), out


def _translate_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be a list", param="tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise InvalidRequest(
                f"tools[{i}]: only tools of type 'function' are supported", param="tools"
            )
        if not fn.get("name"):
            raise InvalidRequest(f"tools[{i}]: function.name is required", param="tools")
        t: dict[str, Any] = {
            "name": fn["name"],
            "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
        }
        if fn.get("description"):
            t["description"] = fn["description"]
        out.append(t)
    return out


def _translate_tool_choice(choice: Any) -> dict[str, Any]:
    if choice == "auto":
        return {"type": "auto"}
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name:
            return {"type": "tool", "name": name}
    raise InvalidRequest(
        "'tool_choice' must be 'auto', 'required', 'none' or "
        '{"type": "function", "function": {"name": ...}}',
        param="tool_choice",
    )


def to_anthropic(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat.completions body → a Messages API body (without ``stream``).

    Parameters Anthropic has no counterpart for are dropped.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if (n := body.get("n")) is not None and n != 1:
        raise InvalidRequest("Anthropic models return one choice: 'n' must be 1", param="n")
    system, messages = _translate_messages(body.get("messages"))
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if system:
        out["system"] = system
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    out["max_tokens"] = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = stop
    elif stop is not None and not isinstance(stop, list):
        raise InvalidRequest("'stop' must be a string or a list of strings", param="stop")
    if body.get("tools"):
        out["tools"] = _translate_tools(body["tools"])
        choice = body.get("tool_choice")
        tc = _translate_tool_choice(choice) if choice is not None else None
        if body.get("parallel_tool_calls") is False and (tc is None or tc["type"] != "none"):
            tc = {**(tc or {"type": "auto"}), "disable_parallel_tool_use": True}
        if tc is not None:
            out["tool_choice"] = tc
    # tool_choice without tools is dropped: Anthropic rejects it, OpenAI ignores "none".
    if body.get("user") is not None:
        out["metadata"] = {"user_id": str(body["user"])}
    return out


# -- response: Anthropic → OpenAI --------------------------------------------


def _count(u: dict[str, Any], key: str) -> int:
    v = u.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def openai_usage(u: dict[str, Any]) -> dict[str, Any]:
    """Anthropic usage → OpenAI usage; the raw numbers stay under ``"anthropic"``.

    Anthropic's ``input_tokens`` excludes cached tokens, OpenAI's
    ``prompt_tokens`` includes them, so cache reads and writes are added back.
    """
    inp = _count(u, "input_tokens")
    read = _count(u, "cache_read_input_tokens")
    write = _count(u, "cache_creation_input_tokens")
    out = _count(u, "output_tokens")
    prompt = inp + read + write
    return {
        "prompt_tokens": prompt,
        "completion_tokens": out,
        "total_tokens": prompt + out,
        "prompt_tokens_details": {"cached_tokens": read},
        "anthropic": {
            "input_tokens": inp,
            "output_tokens": out,
            "cache_read_input_tokens": read,
            "cache_creation_input_tokens": write,
        },
    }


def finish_reason(stop_reason: Any) -> str:
    return _FINISH.get(stop_reason, "stop") if stop_reason else "stop"


def from_anthropic(data: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    """A Messages API response → an OpenAI ``chat.completion`` dict.

    Raises ``ValueError`` when ``data`` is not a message.
    """
    content = data.get("content")
    if not isinstance(content, list):
        raise ValueError("no content list")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        if not isinstance(block, dict):
            raise ValueError("a content block is not an object")
        if block.get("type") == "text":
            texts.append(str(block.get("text") or ""))
        elif block.get("type") == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": orjson.dumps(block.get("input") or {}).decode(),
                    },
                }
            )
        # thinking and other block kinds have no chat.completions counterpart.
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    out: dict[str, Any] = {
        "id": f"chatcmpl-{data.get('id', '')}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": data.get("model") or model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason(data.get("stop_reason")),
            }
        ],
    }
    if isinstance(data.get("usage"), dict):
        out["usage"] = openai_usage(data["usage"])
    return out


def _obj(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


class StreamTranslator:
    """Anthropic stream events → OpenAI ``chat.completion.chunk`` dicts, one event at a time."""

    def __init__(self, provider: str, model: str | None, include_usage: bool) -> None:
        self.provider = provider
        self.model = model
        self.include_usage = include_usage
        self.id = "chatcmpl-"
        self.created = int(time.time())
        self.usage: dict[str, Any] = {}
        self.done = False
        self._tool_index: dict[int, int] = {}  # content block index → tool_calls index

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunks one event makes (often none); an ``error`` event raises UpstreamError."""
        etype = event.get("type")
        if etype == "message_start":
            msg = _obj(event.get("message"))
            self.id = f"chatcmpl-{msg.get('id', '')}"
            self.model = msg.get("model") or self.model
            self.usage.update(_obj(msg.get("usage")))
            return [self._chunk({"role": "assistant", "content": ""})]
        if etype == "content_block_start":
            block = _obj(event.get("content_block"))
            if block.get("type") == "tool_use":
                k = self._tool_index[event.get("index", 0)] = len(self._tool_index)
                call = {"index": k, "id": block.get("id"), "type": "function"}
                call["function"] = {"name": block.get("name"), "arguments": ""}
                return [self._chunk({"tool_calls": [call]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if etype == "content_block_delta":
            delta = _obj(event.get("delta"))
            if delta.get("type") == "text_delta" and delta.get("text"):
                return [self._chunk({"content": delta["text"]})]
            if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
                k = self._tool_index.get(event.get("index", 0), 0)
                call = {"index": k, "function": {"arguments": delta["partial_json"]}}
                return [self._chunk({"tool_calls": [call]})]
            return []  # thinking and signature deltas
        if etype == "message_delta":
            # Counts here are cumulative for the whole message.
            self.usage.update({k: v for k, v in _obj(event.get("usage")).items() if v is not None})
            reason = _obj(event.get("delta")).get("stop_reason")
            return [self._chunk({}, finish_reason(reason))] if reason else []
        if etype == "message_stop":
            self.done = True
            if self.include_usage:
                return [{**self._chunk({}), "choices": [], "usage": openai_usage(self.usage)}]
            return []
        if etype == "error":
            err = event.get("error")
            msg = err.get("message") if isinstance(err, dict) else err
            raise UpstreamError(
                f"upstream '{self.provider}' failed mid-stream: {msg or 'unknown error'}",
                code="upstream_stream_error",
            )
        return []  # ping, content_block_stop, future event kinds


# -- the provider ---------------------------------------------------------------


@register
class AnthropicProvider(Provider):
    kind = "anthropic"
    supports_embeddings = False

    def _headers(self) -> dict[str, str]:
        h = {
            "content-type": "application/json",
            "anthropic-version": self.settings.anthropic_version,
            **self.settings.headers,
        }
        if self.api_key:
            h["x-api-key"] = self.api_key
        return h

    def _url(self) -> str:
        return f"{self.settings.base_url or DEFAULT_BASE_URL}/v1/messages"

    def _malformed(self, what: str) -> UpstreamError:
        return UpstreamError(f"upstream '{self.name}' sent {what}", code="upstream_malformed")

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        payload = to_anthropic(body)
        data = await post_json(
            self.session, self.name, self._url(), orjson.dumps(payload), self._headers()
        )
        if not isinstance(data, dict):
            raise self._malformed("a malformed body (not an object)")
        try:
            return from_anthropic(data, body.get("model"))
        except ValueError as e:
            raise self._malformed(f"a malformed message ({e})") from e

    async def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[ChatChunk]:
        payload = {**to_anthropic(body), "stream": True}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        translator = StreamTranslator(self.name, body.get("model"), include_usage)
        async with open_stream(
            self.session, self.name, self._url(), orjson.dumps(payload), self._headers()
        ) as resp:
            async for data in sse_data(resp, self.name):
                try:
                    event = orjson.loads(data)
                except orjson.JSONDecodeError as e:
                    raise self._malformed(f"a malformed stream event: {data[:200]!r}") from e
                if not isinstance(event, dict):
                    raise self._malformed(f"a malformed stream event: {data[:200]!r}")
                for chunk in translator.feed(event):
                    yield orjson.dumps(chunk), chunk
                if translator.done:
                    return
        raise UpstreamError(
            f"upstream '{self.name}' ended the stream before message_stop",
            code="upstream_stream_error",
        )
