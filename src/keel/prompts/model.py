"""A prompt spec (named, versioned template) and its rendering.

A spec holds either chat ``messages`` (each a role and a Jinja2 template) or one
``text`` template, the variables it declares with their types, and the model
and params it was written for. Rendering runs in a sandboxed Jinja2 environment
with ``StrictUndefined``; variables are checked against their declared types
first and nothing is coerced, so a caller learns which variable is wrong.

This module is imported by the SDK: it must stay light (pydantic, jinja2).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

import jinja2
from jinja2 import StrictUndefined, meta
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from keel.errors import InvalidRequest

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

VarType = Literal["string", "integer", "number", "boolean", "list", "object"]

# Autoescape off: prompts are not HTML. The sandbox stops templates from
# reaching Python internals (``{{ x.__class__ }}`` and friends).
_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


class RenderError(InvalidRequest, ValueError):
    """A variable is missing, undeclared or of the wrong type, or rendering failed.

    ``variable`` names the culprit when there is one; ``param`` is
    ``variables.<name>`` so the API's error body points at it.
    """

    def __init__(self, message: str, variable: str | None = None) -> None:
        super().__init__(
            message,
            code="invalid_prompt_variables",
            param=f"variables.{variable}" if variable else "variables",
        )
        self.variable = variable


def _type_ok(t: str, v: Any) -> bool:
    if t == "string":
        return isinstance(v, str)
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, int | float) and not isinstance(v, bool)
    if t == "boolean":
        return isinstance(v, bool)
    if t == "list":
        return isinstance(v, list | tuple)
    return isinstance(v, dict)  # object


_ARTICLE = {"integer": "an integer", "object": "an object"}


def _type_name(t: str) -> str:
    return _ARTICLE.get(t, f"a {t}")


class VariableSpec(BaseModel):
    """One declared variable. A variable with a default is optional."""

    model_config = ConfigDict(extra="forbid")

    type: VarType = Field("string", description="string|integer|number|boolean|list|object.")
    required: bool = Field(True, description="Must the caller pass it (when it has no default)?")
    default: Any = Field(None, description="Used when the caller does not pass the variable.")
    description: str | None = Field(None, description="What the variable is for.")


class MessageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str = Field(min_length=1, max_length=50, description="system, user, assistant, …")
    content: str = Field(description="A Jinja2 template.")


class PromptSpec(BaseModel):
    """A prompt as pushed: the unit that is versioned (immutably) and labelled."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="Letters, digits, '.', '_', '-'.")
    description: str | None = Field(None, description="What the prompt is for.")
    messages: list[MessageSpec] | None = Field(
        None, description="Chat messages whose contents are Jinja2 templates."
    )
    text: str | None = Field(None, description="One template, rendered as one user message.")
    variables: dict[str, VariableSpec] = Field(default_factory=dict)
    model: str | None = Field(None, description="The model alias the prompt was written for.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Request params (temperature, max_tokens, …)."
    )

    _compiled: list[tuple[str, jinja2.Template]] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> PromptSpec:
        if (self.messages is None) == (self.text is None):
            raise ValueError("a prompt needs exactly one of 'messages' or 'text'")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        for k in ("messages", "prompt", "variables", "model"):
            if k in self.params:
                raise ValueError(f"params cannot set '{k}'")
        for name, var in self.variables.items():
            if not _IDENT.match(name):
                raise ValueError(f"variable name '{name}' must be a Python identifier")
            if var.default is not None and not _type_ok(var.type, var.default):
                raise ValueError(
                    f"the default of variable '{name}' must be {_type_name(var.type)}, "
                    f"got {var.default!r}"
                )
        sources = (
            [("text", self.text or "")]
            if self.messages is None
            else [(f"messages[{i}]", m.content) for i, m in enumerate(self.messages)]
        )
        compiled = []
        for where, src in sources:
            try:
                ast = _ENV.parse(src)
            except jinja2.TemplateSyntaxError as e:
                msg = f"{where}: template syntax error at line {e.lineno}: {e.message}"
                raise ValueError(msg) from None
            unknown = sorted(meta.find_undeclared_variables(ast) - set(self.variables))
            if unknown:
                raise ValueError(
                    f"{where}: the template uses undeclared variable(s) {', '.join(unknown)}; "
                    "declare them under 'variables'"
                )
            compiled.append((where, _ENV.from_string(src)))
        self._compiled = compiled
        return self

    def to_dict(self) -> dict[str, Any]:
        """The spec as pushed, without fields left at their defaults (stable JSON/YAML)."""
        return self.model_dump(mode="json", exclude_defaults=True)

    @property
    def content_hash(self) -> str:
        """sha256 of the canonical JSON of the spec minus its name."""
        d = self.to_dict()
        d.pop("name", None)
        canon = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canon.encode()).hexdigest()


def parse_spec(data: Any, where: str = "") -> PromptSpec:
    """Validate a spec from JSON/YAML data; InvalidRequest with one readable line."""
    prefix = f"{where}: " if where else ""
    if not isinstance(data, dict):
        raise InvalidRequest(f"{prefix}a prompt spec must be a mapping, got {type(data).__name__}")
    try:
        return PromptSpec.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        msg = first.get("msg", "invalid").removeprefix("Value error, ")
        name = data.get("name")
        who = f"prompt '{name}'" if isinstance(name, str) else "prompt"
        raise InvalidRequest(
            f"{prefix}{who}: {loc + ': ' if loc else ''}{msg}", param=loc or None
        ) from None


def check_variables(spec: PromptSpec, variables: dict[str, Any]) -> dict[str, Any]:
    """The full variable mapping for rendering, or RenderError naming the culprit."""
    if not isinstance(variables, dict):
        raise RenderError("'variables' must be an object")
    extra = sorted(k for k in variables if k not in spec.variables)
    if extra:
        declared = ", ".join(sorted(spec.variables)) or "none"
        raise RenderError(
            f"prompt '{spec.name}' does not declare variable(s) {', '.join(extra)} "
            f"(declared: {declared})",
            extra[0],
        )
    out: dict[str, Any] = {}
    for name, var in spec.variables.items():
        if name in variables and variables[name] is not None:
            v = variables[name]
            if not _type_ok(var.type, v):
                raise RenderError(
                    f"variable '{name}' must be {_type_name(var.type)}, got {v!r}", name
                )
            out[name] = v
        elif var.default is not None:
            out[name] = var.default
        elif var.required:
            raise RenderError(f"missing variable '{name}' ({var.type})", name)
        else:
            out[name] = None  # optional: the template can test it with {% if %}
    return out


def render(
    spec: PromptSpec, variables: dict[str, Any] | None = None
) -> tuple[list[dict[str, Any]], str | None, dict[str, Any]]:
    """Render ``spec`` → (chat messages, model or None, params).

    A text prompt renders into one user message.
    """
    values = check_variables(spec, variables or {})
    rendered = []
    for where, tmpl in spec._compiled:
        try:
            rendered.append(tmpl.render(values))
        except jinja2.UndefinedError as e:
            raise RenderError(f"prompt '{spec.name}' {where}: {e.message}") from None
        except jinja2.TemplateError as e:  # incl. sandbox SecurityError
            raise RenderError(f"prompt '{spec.name}' {where}: {e}") from None
        except Exception as e:  # a template doing arithmetic on the wrong thing
            raise RenderError(f"prompt '{spec.name}' {where}: {type(e).__name__}: {e}") from None
    if spec.messages is None:
        messages = [{"role": "user", "content": rendered[0]}]
    else:
        messages = [
            {"role": m.role, "content": c} for m, c in zip(spec.messages, rendered, strict=True)
        ]
    return messages, spec.model, dict(spec.params)


# -- references ---------------------------------------------------------------

_VERSION_REF = re.compile(r"^v?([0-9]+)$")


def resolve_ref(ref: str) -> tuple[str, int | None, str | None]:
    """``name`` / ``name@label`` / ``name@3`` / ``name@v3`` → (name, version, label).

    ``name@latest`` gives (name, None, "latest"); a bare name gives (name, None, None).
    """
    if not isinstance(ref, str) or not ref:
        raise InvalidRequest("a prompt reference must be a non-empty string", param="prompt")
    name, sep, tail = ref.partition("@")
    if not re.match(NAME_PATTERN, name) or (sep and not tail):
        raise InvalidRequest(
            f"invalid prompt reference '{ref}'; use name, name@label or name@3", param="prompt"
        )
    if not sep:
        return name, None, None
    m = _VERSION_REF.match(tail)
    if m:
        return name, int(m.group(1)), None
    return name, None, tail
