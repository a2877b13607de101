"""Gateway integration: a chat request that names a prompt instead of messages.

``{"model": "gpt", "prompt": "greet@production", "variables": {"name": "Ada"}}``
is rendered into ``messages`` before the gateway checks and forwards the body;
``prompt`` and ``variables`` are Keel's fields and never reach the upstream.
"""

from __future__ import annotations

from typing import Any

from keel.errors import InvalidRequest
from keel.prompts.model import render

_KEEL_FIELDS = ("prompt", "variables")


def expand_prompt(store: Any, body: Any) -> tuple[Any, str | None]:
    """(body with rendered ``messages``, prompt version id), or (body, None) untouched.

    The prompt's model is used when the body names none; its params apply
    under the body's own. Raises InvalidRequest (``param="variables.<name>"``)
    when rendering fails and NotFound for an unknown prompt, version or label.
    """
    # Every chat call passes here: the common case is one dict lookup.
    if type(body) is not dict or "prompt" not in body:
        return body, None
    ref = body["prompt"]
    if not isinstance(ref, str) or not ref:
        raise InvalidRequest("'prompt' must be a reference like 'name@production'", param="prompt")
    if body.get("messages"):  # an empty list is fine: SDKs insist on sending one
        raise InvalidRequest("send either 'messages' or 'prompt', not both", param="prompt")
    variables = body.get("variables")
    if variables is None:
        variables = {}
    elif not isinstance(variables, dict):
        raise InvalidRequest("'variables' must be an object", param="variables")
    pv = store.get(ref)
    messages, model, params = render(pv.spec, variables)
    out = {k: v for k, v in body.items() if k not in _KEEL_FIELDS}
    for k, v in params.items():
        out.setdefault(k, v)
    if model and not out.get("model"):
        out["model"] = model
    out["messages"] = messages
    return out, pv.id
