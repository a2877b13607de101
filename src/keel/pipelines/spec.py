"""``pipeline.yaml``: named steps with inputs and outputs, validated with clear paths.

    name: intent-classifier
    steps:
      - name: validate
        kind: validate-data          # the dataset checks; fails on error-level findings
        dataset: intents             # NAME, NAME@<version id>; with file: imported first
        file: data/intents.jsonl
        data_kind: eval
      - name: train
        kind: train                  # any command, locally or as a Ray job
        command: python train.py
        inputs: [train.py]           # files/directories whose content is hashed
        datasets: ["${steps.validate.outputs.dataset}"]
        params: {epochs: 300}
      - name: evaluate
        kind: evaluate               # an eval suite (suite:) or an eval command over a run
        command: python evaluate.py --run ${steps.train.outputs.run_id}
        thresholds: {accuracy: 0.8}
      - name: register
        kind: register
        model: intent-classifier
        run: ${steps.train.outputs.run_id}
        artifact: model

``${steps.NAME.outputs.KEY}`` in any string takes an earlier step's output and
makes that step a dependency (as does ``needs:``). Relative paths are relative
to the pipeline file. Every mapping forbids unknown keys, and an error names
the field path (``steps.1.command: …``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from keel.errors import InvalidRequest

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
REF = re.compile(r"\$\{steps\.([A-Za-z0-9._-]+)\.outputs\.([A-Za-z0-9_]+)\}")


class PipelineError(InvalidRequest, ValueError):
    """A pipeline file that cannot run; the message names the file and the field."""

    code = "invalid_pipeline"


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME, description="Unique within the pipeline.")
    needs: list[str] = Field(default_factory=list, description="Steps that run before.")
    inputs: list[str] = Field(
        default_factory=list, description="Files/directories whose content decides reruns."
    )


class ValidateDataStep(_Step):
    kind: Literal["validate-data"]
    dataset: str = Field(min_length=1, description="NAME or NAME@<version id>.")
    file: str | None = Field(None, description="Import this file as a new version first.")
    data_kind: Literal["chat", "completion", "eval"] | None = Field(
        None, description="Row shape of file (required with file)."
    )
    fail_on: Literal["error", "warning"] = "error"


class TrainStep(_Step):
    kind: Literal["train"]
    command: str | list[str] = Field(description="What to run (a string goes through shlex).")
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = Field(
        None, description="Ray dashboard address (default $RAY_ADDRESS)."
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Logged on the run; env KEEL_PARAMS."
    )
    datasets: list[str] = Field(default_factory=list, description="Dataset versions the run uses.")
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(24 * 3600.0, gt=0)


class FinetuneStep(_Step):
    kind: Literal["finetune"]
    provider: str = Field(description="A provider of keel.yaml (its base_url and key).")
    dataset: str = Field(description="The training rows: a dataset version.")
    base_model: str = Field(min_length=1)
    suffix: str | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    poll_s: float = Field(5.0, gt=0)
    max_poll_s: float = Field(60.0, gt=0)
    timeout_s: float = Field(24 * 3600.0, gt=0)


class EvaluateStep(_Step):
    kind: Literal["evaluate"]
    suite: str | None = Field(None, description="An eval suite (keel eval run).")
    model: str | None = Field(None, description="Run the suite against this model alias instead.")
    command: str | list[str] | None = Field(
        None, description="Or an eval script, run as a tracked run; thresholds gate its metrics."
    )
    thresholds: dict[str, float] = Field(default_factory=dict, description="metric: minimum.")
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(3600.0, gt=0)


class RegisterStep(_Step):
    kind: Literal["register"]
    model: str = Field(pattern=NAME, description="Registry model name.")
    run: str | None = Field(None, description="The run whose artifact is the model.")
    artifact: str | None = None
    deployment: dict[str, Any] | None = Field(None, description="{provider, model, params}.")
    card: str | None = Field(None, description="A Markdown file: the model card.")
    description: str | None = None


Step = Annotated[
    ValidateDataStep | TrainStep | FinetuneStep | EvaluateStep | RegisterStep,
    Field(discriminator="kind"),
]
KINDS = ("validate-data", "train", "finetune", "evaluate", "register")


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME)
    description: str | None = None
    steps: list[Step] = Field(min_length=1)

    # set by load_pipeline
    base_dir: Path = Field(Path("."), exclude=True)
    order: list[str] = Field(default_factory=list, exclude=True)
    deps: dict[str, list[str]] = Field(default_factory=dict, exclude=True)

    def step(self, name: str) -> Any:
        return next(s for s in self.steps if s.name == name)


def refs_in(value: Any) -> list[tuple[str, str]]:
    """Every ``${steps.X.outputs.K}`` in a (nested) value."""
    if isinstance(value, str):
        return REF.findall(value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in refs_in(v)]
    if isinstance(value, list):
        return [r for v in value for r in refs_in(v)]
    return []


def _where(loc: tuple[Any, ...]) -> str:
    # The discriminated union adds the kind to the path (steps.1.train.command): drop it.
    return ".".join(str(p) for p in loc if p not in KINDS) or "(top level)"


def _check_kinds(doc: dict[str, Any], where: str) -> None:
    for i, s in enumerate(doc.get("steps") or []):
        if isinstance(s, dict) and "kind" in s and s["kind"] not in KINDS:
            raise PipelineError(
                f"{where}: steps.{i}.kind: unknown step kind {s['kind']!r} "
                f"(kinds: {', '.join(KINDS)})"
            )
        if isinstance(s, dict) and "kind" not in s:
            raise PipelineError(f"{where}: steps.{i}.kind: missing (kinds: {', '.join(KINDS)})")


def _toposort(spec: PipelineSpec, where: str) -> None:
    names = [s.name for s in spec.steps]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PipelineError(f"{where}: steps: duplicate step name(s) {', '.join(dupes)}")
    deps: dict[str, list[str]] = {}
    for i, s in enumerate(spec.steps):
        d = list(s.needs)
        d += [r[0] for r in refs_in(s.model_dump(exclude={"needs", "name"}))]
        for dep in d:
            if dep not in names:
                raise PipelineError(
                    f"{where}: steps.{i} ({s.name}): depends on unknown step {dep!r} "
                    f"(steps: {', '.join(names)})"
                )
            if dep == s.name:
                raise PipelineError(f"{where}: steps.{i} ({s.name}): depends on itself")
        deps[s.name] = sorted(set(d), key=names.index)
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cyc = [*path[path.index(n) :], n]
            raise PipelineError(f"{where}: steps: dependency cycle {' -> '.join(cyc)}")
        state[n] = 1
        for d in deps[n]:
            visit(d, [*path, n])
        state[n] = 2
        order.append(n)

    for n in names:  # file order among independent steps
        visit(n, [])
    spec.order, spec.deps = order, deps


def parse_pipeline(doc: Any, where: str = "pipeline", base_dir: Path | None = None) -> PipelineSpec:
    """Validate a parsed pipeline document (raises :class:`PipelineError`)."""
    if not isinstance(doc, dict):
        raise PipelineError(f"{where}: a pipeline is a mapping with name and steps")
    _check_kinds(doc, where)
    try:
        spec = TypeAdapter(PipelineSpec).validate_python(doc)
    except ValidationError as e:
        err = e.errors()[0]
        raise PipelineError(f"{where}: {_where(err['loc'])}: {err['msg']}") from None
    spec.base_dir = base_dir or Path(".")
    _toposort(spec, where)
    for i, s in enumerate(spec.steps):
        if isinstance(s, ValidateDataStep) and s.file and not s.data_kind:
            raise PipelineError(f"{where}: steps.{i}.data_kind: required with file")
        if isinstance(s, EvaluateStep) and (s.suite is None) == (s.command is None):
            raise PipelineError(f"{where}: steps.{i}: give either suite or command")
        if isinstance(s, EvaluateStep) and s.command is not None and not s.thresholds:
            raise PipelineError(f"{where}: steps.{i}.thresholds: an eval command needs thresholds")
        if isinstance(s, RegisterStep):
            if (s.artifact is None) == (s.deployment is None):
                raise PipelineError(
                    f"{where}: steps.{i}: give either artifact (with run) or deployment"
                )
            if s.artifact is not None and not s.run:
                raise PipelineError(
                    f"{where}: steps.{i}.run: an artifact needs the run that made it"
                )
    return spec


def load_pipeline(path: str | Path) -> PipelineSpec:
    """Read and validate a pipeline file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{p}: no such file") from None
    except OSError as e:
        raise PipelineError(f"{p}: {e.strerror or e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise PipelineError(f"{p}: not valid YAML{at}") from None
    return parse_pipeline(doc, str(p), p.resolve().parent)
