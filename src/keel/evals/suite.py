"""The experiment suite: which dataset, which targets, which evaluators, which gates.

A suite is a YAML file. Every mapping is validated with ``extra="forbid"``, so
a typo is an error that names its path (``evaluators.1.params.rubric: …``)::

    name: support-qa                 # letters, digits, '.', '_', '-'
    description: Answers of the support bot   # optional
    dataset: qa@latest               # NAME, NAME@latest or NAME@<version id prefix>
    split: test                      # optional: only this split of the version
    limit: 200                       # optional: only the first N items
    targets:                         # one run per target
      - name: gpt-v3
        model: gpt                   # a gateway model alias
        prompt: support-answer@3     # optional: NAME@VERSION or NAME@LABEL, rendered per row
        params: {temperature: 0}     # request params (under the prompt's own)
      - name: claude
        model: claude
    evaluators:                      # each one is a metric named `name`
      - name: accuracy
        kind: exact_match            # `keel eval evaluators` lists the kinds and options
        params: {case_sensitive: false}
      - {name: judge, kind: llm_judge, params: {model: gpt, rubric: correctness}}
    thresholds: {accuracy: 0.8}      # the mean required per metric; the CI gate fails below
    concurrency: 16                  # optional: items in flight (default evals.concurrency)

How a dataset row becomes a model call:

- without a prompt: an ``eval`` row's ``input`` (a string) is one user message,
  or ``input.messages`` when the input is an object holding chat messages; a
  ``chat`` row's messages up to its last assistant message are sent and that
  last message is the expected answer; a ``completion`` row's ``prompt`` is one
  user message and its ``completion`` is expected.
- with a prompt: the prompt is rendered with the row's variables: the fields of
  an object ``input``, else ``input`` itself as the variable ``input``, plus
  the row's ``metadata`` fields, keeping only the variables the prompt declares.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from keel.errors import InvalidRequest

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
# Keys a target's params may not set: the runner owns them.
_RESERVED_PARAMS = ("model", "messages", "prompt", "variables", "stream", "n")


class SuiteError(InvalidRequest, ValueError):
    """A suite that cannot run; the message names the file and the field path."""

    code = "invalid_suite"


class TargetSpec(BaseModel):
    """One thing under test: a model alias, optionally a prompt version, and params."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="Names the run of this target.")
    model: str | None = Field(
        None, min_length=1, description="Gateway model alias (default: the prompt's model)."
    )
    prompt: str | None = Field(None, min_length=1, description="NAME@VERSION or NAME@LABEL.")
    params: dict[str, Any] = Field(default_factory=dict, description="Request params.")

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in _RESERVED_PARAMS if k in v]
        if bad:
            raise ValueError(f"params cannot set {', '.join(repr(k) for k in bad)}")
        return v

    @model_validator(mode="after")
    def _model_or_prompt(self) -> TargetSpec:
        if self.model is None and self.prompt is None:
            raise ValueError("a target needs a 'model' (or a 'prompt' that names one)")
        return self


class EvaluatorSpec(BaseModel):
    """One metric: an evaluator kind with its options."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,99}$", description="Metric name.")
    kind: str = Field(min_length=1, description="Evaluator kind.")
    params: dict[str, Any] = Field(default_factory=dict, description="Its options.")


class Suite(BaseModel):
    """A validated suite (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    dataset: str = Field(min_length=1, description="NAME, NAME@latest or NAME@<id prefix>.")
    split: str | None = Field(None, min_length=1)
    limit: int | None = Field(None, ge=1, description="Only the first N items.")
    targets: list[TargetSpec] = Field(min_length=1)
    evaluators: list[EvaluatorSpec] = Field(min_length=1)
    thresholds: dict[str, float] = Field(default_factory=dict)
    concurrency: int | None = Field(None, ge=1, le=512)

    @model_validator(mode="after")
    def _names(self) -> Suite:
        for what, names in (
            ("targets", [t.name for t in self.targets]),
            ("evaluators", [e.name for e in self.evaluators]),
        ):
            seen: set[str] = set()
            for i, n in enumerate(names):
                if n in seen:
                    raise _Located(f"{what}.{i}.name", f"duplicate name {n!r}")
                seen.add(n)
        metrics = {e.name for e in self.evaluators}
        for k in self.thresholds:
            if k not in metrics:
                raise _Located(
                    f"thresholds.{k}",
                    f"no evaluator named {k!r} (metrics: {', '.join(sorted(metrics))})",
                )
        return self

    @property
    def metrics(self) -> list[str]:
        return [e.name for e in self.evaluators]

    def content(self) -> dict[str, Any]:
        """The suite as data (what a run records and what its resume key hashes)."""
        return self.model_dump(mode="json")

    def resume_key(self, target: str, dataset_version: str, prompt_version: str | None) -> str:
        """sha256 of the suite's content, the target and the resolved versions.

        The resolved dataset and prompt versions are part of it because
        ``qa@latest`` or ``prompt@production`` may mean something else tomorrow:
        a run must only be resumed over the very same inputs.
        """
        doc = {"suite": self.content(), "target": target, "dataset": dataset_version,
               "prompt": prompt_version}  # fmt: skip
        return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


class _Located(ValueError):
    """A model-level error that knows the path of the field at fault."""

    def __init__(self, loc: str, msg: str) -> None:
        super().__init__(msg)
        self.loc = loc


def _format(e: ValidationError, where: str) -> str:
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    ctx = first.get("ctx") or {}
    err = ctx.get("error")
    msg = first.get("msg", "invalid").removeprefix("Value error, ")
    if isinstance(err, _Located):
        loc, msg = err.loc, str(err)
    elif first.get("type") == "extra_forbidden":
        msg = "unknown field"
    return f"{where}{loc + ': ' if loc else ''}{msg}"


def _check_evaluators(suite: Suite, where: str) -> None:
    """Each kind exists and its params validate (without building: judges need a gateway)."""
    from keel.evals import evaluators  # registers the built-in kinds
    from keel.evals.base import EVALUATORS

    evaluators.load_plugins()
    for i, spec in enumerate(suite.evaluators):
        cls = EVALUATORS.get(spec.kind)
        if cls is None:
            raise SuiteError(
                f"{where}evaluators.{i}.kind: unknown evaluator {spec.kind!r} "
                f"(known: {', '.join(sorted(EVALUATORS))})"
            )
        try:
            cls.Options.model_validate(spec.params)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ()))
            msg = first.get("msg", "invalid").removeprefix("Value error, ")
            if first.get("type") == "extra_forbidden":
                msg = f"unknown option of {spec.kind!r}"
            path = f"evaluators.{i}.params" + (f".{loc}" if loc else "")
            raise SuiteError(f"{where}{path}: {msg}") from None


def parse_suite(data: Any, where: str = "") -> Suite:
    """Validate suite data; SuiteError with one line ``<where>: <field path>: <problem>``."""
    prefix = f"{where}: " if where else ""
    if not isinstance(data, dict):
        raise SuiteError(f"{prefix}a suite must be a mapping, got {type(data).__name__}")
    try:
        suite = Suite.model_validate(data)
    except ValidationError as e:
        raise SuiteError(_format(e, prefix)) from None
    _check_evaluators(suite, prefix)
    return suite


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite YAML file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SuiteError(f"no such suite file: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SuiteError(f"cannot read {p}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise SuiteError(f"{p}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    return parse_suite(data, str(p))
