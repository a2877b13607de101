"""Reading the request and response bodies the recorder stored with a trace.

Shared by everything that looks inside recorded calls after the fact: online
evaluators, drift features, datasets built from traces.
"""

from __future__ import annotations

from typing import Any

import orjson


def parse_body(text: str | None) -> Any:
    """A stored body as JSON; None when absent or not JSON (e.g. cut by a size limit)."""
    if not text:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def content_text(content: Any) -> str | None:
    """The text of a message's content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        text = "\n".join(p for p in parts if isinstance(p, str))
        return text or None
    return None


def last_user_text(messages: Any) -> str | None:
    """The text of the last user message of a chat request."""
    if not isinstance(messages, list):
        return None
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return content_text(m.get("content"))
    return None


def assistant_message(response: Any) -> dict[str, Any] | None:
    """The assistant message of a stored response (a completion, or an assembled stream);
    None when there is none or the body was truncated in the store."""
    if not isinstance(response, dict) or response.get("_keel_truncated"):
        return None
    msg = response.get("message")  # a stream: the assembled message
    if msg is None:
        choices = response.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            msg = choices[0].get("message")
    if not isinstance(msg, dict):
        return None
    out = {"role": msg.get("role") or "assistant", "content": msg.get("content")}
    if msg.get("tool_calls"):
        out["tool_calls"] = msg["tool_calls"]
    return out


def answer_text(response: Any) -> str | None:
    """The assistant's text in a stored response."""
    msg = assistant_message(response)
    return content_text(msg["content"]) if msg is not None else None
