"""LLM-as-judge: a rubric prompt scored by any model through the gateway.

Options: ``model`` (a gateway alias), ``rubric`` (a built-in name — correctness,
helpfulness, faithfulness, relevance, toxicity — or a stored prompt
``name@version`` / ``name@label`` / ``name:label``), ``scale`` (``"1-5"``,
``"1-10"``, ``"pass/fail"``…, normalized to [0, 1]), ``max_retries``, ``params``.

The rubric comes from the PromptStore given as ``context={"prompt_store": store}``
to :func:`~keel.evals.base.build_evaluator`; built-in rubrics are pushed there
on first use, so ``details["prompt"]`` names the exact version that judged
(without a store, a built-in rubric is used as is and recorded as
``keel-judge-<name>@builtin-<hash>``).

The judge must answer ``{"reasoning": "...", "score": N}`` (code fences
tolerated). A malformed or out-of-range judgment gets a corrective follow-up
message, up to ``max_retries`` times; after that — or when the gateway answers
with an error — the score is ``value=None`` with ``details["error"]`` (and
``details["retryable"]`` true for gateway errors worth retrying later).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson
from pydantic import BaseModel, Field, ValidationError, field_validator

from keel.errors import InvalidRequest, KeelError
from keel.evals.base import EvalCase, EvalOptions, Evaluator, Score, register_evaluator
from keel.evals.evaluators._util import extract_json, no_output
from keel.evals.evaluators.rubrics import RUBRICS, rubric_spec
from keel.prompts.model import PromptSpec, parse_spec, render, resolve_ref

FEATURE = "keel:judge"
_SCALE = re.compile(r"^\s*(-?\d+)\s*-\s*(-?\d+)\s*$")
_PASS = {"pass": 1, "passed": 1, "yes": 1, "true": 1, "fail": 0, "failed": 0, "no": 0, "false": 0}


def parse_scale(scale: str) -> tuple[int, int]:
    """``"1-5"`` → (1, 5); ``"pass/fail"`` → (0, 1)."""
    s = scale.strip().lower()
    if s in ("pass/fail", "pass-fail", "binary"):
        return 0, 1
    m = _SCALE.match(s)
    if not m or int(m.group(1)) >= int(m.group(2)):
        raise ValueError(f"scale must look like '1-5' or be 'pass/fail', got {scale!r}")
    return int(m.group(1)), int(m.group(2))


def rubric_ref(rubric: str) -> str | None:
    """None for a built-in rubric, else the stored prompt's reference (``name@…``)."""
    if rubric in RUBRICS:
        return None
    if "@" not in rubric and ":" in rubric:
        rubric = rubric.replace(":", "@", 1)  # name:label, as written in some tools
    resolve_ref(rubric)  # InvalidRequest when it is not a reference at all
    return rubric


class JudgeOptions(EvalOptions):
    model: str = Field(min_length=1, description="The judge: a gateway model alias.")
    rubric: str = Field(
        "correctness",
        description=f"Built-in ({', '.join(RUBRICS)}) or a stored prompt name@version|label.",
    )
    scale: str = Field("1-5", description="'1-5', '1-10', 'pass/fail', … (normalized to 0..1).")
    max_retries: int = Field(2, ge=0, le=10, description="Follow-ups after a malformed judgment.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Request params for the judge (temperature 0 default)."
    )
    json_mode: bool = Field(
        True, description="Send response_format json_object (turn off for models without it)."
    )

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: str) -> str:
        parse_scale(v)
        return v

    @field_validator("rubric")
    @classmethod
    def _rubric(cls, v: str) -> str:
        try:
            rubric_ref(v)
        except InvalidRequest:
            raise ValueError(
                f"unknown rubric {v!r}: use one of {', '.join(RUBRICS)} or a stored prompt "
                "reference like 'my-rubric@3' or 'my-rubric@production'"
            ) from None
        return v

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, Any]) -> dict[str, Any]:
        for k in ("model", "messages", "stream", "prompt", "variables"):
            if k in v:
                raise ValueError(f"params cannot set {k!r}")
        return v


def _lenient(v: Any) -> Any:
    if isinstance(v, str):
        s = v.strip().lower()
        if s in _PASS:
            return _PASS[s]
        return s
    if isinstance(v, bool):
        return int(v)
    return v


def _judgment_model(lo: int, hi: int) -> type[BaseModel]:
    class Judgment(BaseModel):
        reasoning: str = Field(min_length=1)
        score: float = Field(ge=lo, le=hi)

        @field_validator("score", mode="before")
        @classmethod
        def _score(cls, v: Any) -> Any:
            return _lenient(v)

    return Judgment


def input_text(inp: Any) -> str:
    """The judged request as text: chat messages become ``role: content`` lines."""
    if inp is None:
        return ""
    if isinstance(inp, str):
        return inp
    if isinstance(inp, list):
        lines = []
        for m in inp:
            if isinstance(m, dict):
                c = m.get("content")
                if isinstance(c, list):
                    c = " ".join(p.get("text", "") for p in c if isinstance(p, dict))
                lines.append(f"{m.get('role', 'user')}: {c or ''}")
            else:
                lines.append(str(m))
        return "\n".join(lines)
    if isinstance(inp, dict) and isinstance(inp.get("messages"), list):
        return input_text(inp["messages"])
    return orjson.dumps(inp, default=str).decode()


def _text(v: Any) -> str | None:
    if v is None:
        return None
    return v if isinstance(v, str) else orjson.dumps(v, default=str).decode()


@register_evaluator
class LLMJudge(Evaluator):
    kind = "llm_judge"
    description = "A model scores the output with a rubric prompt (reasoning stored)."
    Options = JudgeOptions
    uses_model = True

    def __init__(self, options: JudgeOptions, client: Any = None) -> None:  # type: ignore[override]
        super().__init__(options, client)
        self.lo, self.hi = parse_scale(options.scale)
        self._Judgment = _judgment_model(self.lo, self.hi)
        self._ref = rubric_ref(options.rubric)
        self._builtin: tuple[PromptSpec, str] | None = None
        self._lock = asyncio.Lock()

    @property
    def prompt_store(self) -> Any:
        return getattr(self, "context", {}).get("prompt_store")

    async def _rubric(self) -> tuple[PromptSpec, str, str | None]:
        """(spec, "name@vN", prompt version id) of the rubric to use now."""
        store = self.prompt_store
        if self._ref is not None:
            if store is None:
                raise InvalidRequest(
                    f"rubric {self._ref!r} is a stored prompt; the judge needs the prompt store",
                    param="rubric",
                )
            pv = await asyncio.to_thread(store.get, self._ref)
            return pv.spec, pv.ref, pv.id
        async with self._lock:
            if self._builtin is None:
                data = rubric_spec(self.options.rubric)  # type: ignore[attr-defined]
                if store is not None:
                    pv, _ = await asyncio.to_thread(store.push, data, "keel", "built-in rubric")
                    self._builtin = (pv.spec, pv.ref)
                    self._builtin_id: str | None = pv.id
                else:
                    spec = parse_spec(data)
                    self._builtin = (spec, f"{spec.name}@builtin-{spec.content_hash[:12]}")
                    self._builtin_id = None
        return self._builtin[0], self._builtin[1], self._builtin_id

    def _variables(self, spec: PromptSpec, case: EvalCase) -> dict[str, Any]:
        context = case.metadata.get("context") if isinstance(case.metadata, dict) else None
        values = {
            "input": input_text(case.input),
            "output": case.output or "",
            "expected": _text(case.expected),
            "context": _text(context),
            "scale_min": self.lo,
            "scale_max": self.hi,
        }
        return {k: v for k, v in values.items() if k in spec.variables}

    def _parse(self, raw: str) -> tuple[Any, str | None]:
        data, err = extract_json(raw)
        if err is not None:
            return None, f"the reply is {err}"
        if not isinstance(data, dict):
            return None, "the reply must be a JSON object"
        try:
            return self._Judgment.model_validate(data), None
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "reply"
            return None, f"{loc}: {first['msg']}"

    async def evaluate(self, case: EvalCase) -> Score:
        if (bad := no_output(case)) is not None:
            return bad
        o: JudgeOptions = self.options  # type: ignore[assignment]
        spec, prompt_ref, prompt_id = await self._rubric()
        messages, _, spec_params = render(spec, self._variables(spec, case))
        body: dict[str, Any] = {"temperature": 0, **spec_params, **o.params, "model": o.model}
        if o.json_mode:
            body.setdefault("response_format", {"type": "json_object"})
        details: dict[str, Any] = {
            "judge_model": o.model,
            "prompt": prompt_ref,
            "prompt_version_id": prompt_id,
            "scale": o.scale,
            "attempts": 0,
            "trace_ids": [],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0},
        }
        raw, why = "", ""
        for attempt in range(o.max_retries + 1):
            details["attempts"] = attempt + 1
            try:
                res = await self.client.chat(  # type: ignore[union-attr]
                    {**body, "messages": messages}, feature=FEATURE
                )
            except Exception as e:
                status = getattr(e, "status", None)
                details.update(
                    error=f"judge call failed: {e}",
                    retryable=status is None or status in (408, 429) or status >= 500,
                )
                if isinstance(e, KeelError) and getattr(e, "trace_id", None):
                    details["trace_ids"].append(e.trace_id)  # type: ignore[attr-defined]
                return Score(value=None, details=details)
            if res.trace_id:
                details["trace_ids"].append(res.trace_id)
            for k in ("prompt_tokens", "completion_tokens"):
                details["usage"][k] += int(res.usage.get(k) or 0)
            raw = res.text
            judgment, why = self._parse(raw)
            if judgment is not None:
                return self._score(judgment, raw, details)
            messages = [
                *messages,
                {"role": "assistant", "content": raw},
                {
                    "role": "user",
                    "content": f"Your reply could not be used: {why}. Reply with only a JSON "
                    f'object {{"reasoning": "<why>", "score": <integer from {self.lo} to '
                    f"{self.hi}>}} and nothing else.",
                },
            ]
        details.update(error=f"malformed judgment after {details['attempts']} attempt(s): {why}")
        details["raw"] = raw[:4000]
        details["retryable"] = False
        return Score(value=None, details=details)

    def _score(self, judgment: Any, raw: str, details: dict[str, Any]) -> Score:
        details["raw"] = raw[:4000]
        details["judgment"] = judgment.score
        value = (judgment.score - self.lo) / (self.hi - self.lo)
        score = Score(value=round(value, 6), reasoning=judgment.reasoning, details=details)
        if self.hi - self.lo == 1:
            score.label = "pass" if judgment.score >= self.hi else "fail"
            if self.options.threshold is None:
                score.passed = judgment.score >= self.hi
        return self.finish(score)
