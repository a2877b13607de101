"""The evaluator contract: one small class per kind, in a registry.

An evaluator scores one :class:`EvalCase` (an input, the model's output, the
expected answer when there is one, and the call's tokens/latency/cost) and
returns a :class:`Score`. Its options are a pydantic model with
``extra="forbid"`` so a typo in a suite or in ``keel.yaml`` is an error that
names the field. Evaluators that need a model (judges, embeddings) get a
:class:`ModelClient`, which calls models through Keel's gateway so the calls
are recorded and priced like any other.

The same evaluator objects run offline (experiments) and online (sampled
production traces).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from keel.errors import InvalidRequest


class EvalOptions(BaseModel):
    """Base of every evaluator's options."""

    model_config = ConfigDict(extra="forbid")
    threshold: float | None = None  # passed = value >= threshold, when set


@dataclass
class EvalCase:
    input: Any  # the rendered input: chat messages (list of dicts) or text
    output: str | None  # the model's answer (text), None when the call failed
    expected: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None
    cost_usd: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    trace_id: str | None = None
    model: str | None = None


@dataclass
class Score:
    value: float | None  # usually in [0, 1]; None: could not score (see details)
    label: str | None = None
    passed: bool | None = None
    reasoning: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    cost_usd: float = 0.0  # what scoring cost (a judge's call)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value}
        for k in ("label", "passed", "reasoning"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        if self.details:
            out["details"] = self.details
        if self.cost_usd:
            out["cost_usd"] = self.cost_usd
        return out


@dataclass
class ChatResult:
    response: dict[str, Any]  # the OpenAI-format response body
    trace_id: str | None = None
    latency_ms: float = 0.0

    @property
    def text(self) -> str:
        choices = self.response.get("choices") or [{}]
        return (choices[0].get("message") or {}).get("content") or ""

    @property
    def usage(self) -> dict[str, Any]:
        return self.response.get("usage") or {}


class ModelClient(Protocol):
    """Calls models through Keel's gateway (over HTTP or in process)."""

    async def chat(self, body: dict[str, Any], *, feature: str | None = None) -> ChatResult: ...

    async def embed(self, texts: list[str], model: str) -> list[list[float]]: ...


class Evaluator:
    kind: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[EvalOptions]] = EvalOptions
    requires_expected: ClassVar[bool] = False
    uses_model: ClassVar[bool] = False  # needs a ModelClient

    def __init__(self, options: EvalOptions, client: ModelClient | None = None) -> None:
        self.options = options
        self.client = client
        # What build_evaluator's ``context`` gave (e.g. ``prompt_store`` for judges).
        self.context: dict[str, Any] = {}

    async def evaluate(self, case: EvalCase) -> Score:  # pragma: no cover - overridden
        raise NotImplementedError

    def finish(self, score: Score) -> Score:
        """Apply the common ``threshold`` option (subclasses call it on their result)."""
        t = self.options.threshold
        if t is not None and score.value is not None and score.passed is None:
            score.passed = score.value >= t
        return score


EVALUATORS: dict[str, type[Evaluator]] = {}


def register_evaluator(cls: type[Evaluator]) -> type[Evaluator]:
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no kind")
    EVALUATORS[cls.kind] = cls
    return cls


def validate_evaluator(
    kind: str, params: dict[str, Any] | None = None
) -> tuple[type[Evaluator], EvalOptions]:
    """Check ``kind`` and its ``params`` without building it (no client needed), e.g. for
    ``keel config check``; InvalidRequest names what is wrong."""
    from keel.evals import evaluators  # registers the built-in kinds

    evaluators.load_plugins()
    cls = EVALUATORS.get(kind)
    if cls is None:
        why = evaluators.PLUGIN_ERRORS.get(kind)
        raise InvalidRequest(
            f"evaluator {kind!r}: its plugin failed to load: {why}"
            if why
            else f"unknown evaluator {kind!r} (known: {', '.join(sorted(EVALUATORS))})",
            param="evaluator",
        )
    if not isinstance(params, dict | None):
        raise InvalidRequest(f"evaluator {kind!r}: params must be a mapping", param="params")
    try:
        opts = cls.Options.model_validate(params or {})
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise InvalidRequest(
            f"evaluator {kind!r}: {loc + ': ' if loc else ''}{msg}", param=loc or None
        ) from None
    return cls, opts


def build_evaluator(
    kind: str,
    params: dict[str, Any] | None = None,
    client: ModelClient | None = None,
    *,
    context: dict[str, Any] | None = None,
) -> Evaluator:
    """An evaluator of ``kind`` with validated ``params``; InvalidRequest names what is wrong.

    ``context`` carries optional collaborators some kinds use: ``prompt_store``
    (a :class:`keel.prompts.store.PromptStore`) lets ``llm_judge`` store its
    built-in rubrics as prompt versions and read rubrics stored by users.
    """
    cls, opts = validate_evaluator(kind, params)
    if cls.uses_model and client is None:
        raise InvalidRequest(f"evaluator {kind!r} calls a model; it needs the gateway")
    ev = cls(opts, client)
    ev.context = dict(context or {})
    return ev
