"""Prompts: named, versioned templates with labels.

For applications (``keel.prompts``)::

    import keel
    p = keel.prompts.get("greet", label="production")
    messages = p.render(name="Ada")

Only the light modules are imported here (the spec model and the SDK); the
store, REST router, gateway hook and CLI live in ``keel.prompts.store``,
``.api``, ``.gateway`` and ``.cli``.
"""

from __future__ import annotations

from keel.prompts.model import PromptSpec, RenderError, VariableSpec, render, resolve_ref
from keel.prompts.sdk import Prompt, get

__all__ = ["Prompt", "PromptSpec", "RenderError", "VariableSpec", "get", "render", "resolve_ref"]
