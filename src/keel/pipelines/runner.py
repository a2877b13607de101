"""Run a pipeline: steps in dependency order, unchanged steps skipped, first failure stops.

Each step's inputs (its resolved fields, the content of its files and
directories, the dataset version ids it reads) hash to ``input_hash``; when a
succeeded step of the same pipeline had the same hash, the step is skipped and
its recorded outputs are reused. Output lines are prefixed with the step name
and also written to ``<data_dir>/pipelines/<pipeline run id>.log``.

Runs, the registry and gateway evaluations go through Keel's REST API (like
``keel.run``); datasets and the pipeline rows are read and written in the
store directly, like ``keel data`` and ``keel eval``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import orjson
from sqlalchemy.engine import Engine

from keel.daemon import now_ms
from keel.data.versions import DatasetStore
from keel.errors import InvalidRequest, KeelError
from keel.pipelines import record
from keel.pipelines.executors import run_local
from keel.pipelines.spec import REF, PipelineSpec
from keel.pipelines.steps import StepFailed, StepKinds
from keel.runs._client import ApiClient

KEEL_CLI = [sys.executable, "-c", "from keel.cli import main; main()"]


def hash_path(p: Path) -> str:
    """Content hash of a file, or of a directory's files and relative names."""
    h = hashlib.sha256()
    if not p.exists():
        raise InvalidRequest(f"input {p} does not exist")
    files = (
        [p]
        if p.is_file()
        else sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    )
    for f in files:
        h.update(str(f.relative_to(p) if f != p else f.name).encode() + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def substitute(value: Any, outputs: dict[str, dict[str, Any]]) -> Any:
    """Replace ``${steps.X.outputs.K}`` with the value (whole-string refs keep their type)."""
    if isinstance(value, str):
        m = REF.fullmatch(value)
        if m:
            return _output(outputs, *m.groups())
        return REF.sub(lambda m: str(_output(outputs, *m.groups())), value)
    if isinstance(value, dict):
        return {k: substitute(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, outputs) for v in value]
    return value


def _output(outputs: dict[str, dict[str, Any]], step: str, key: str) -> Any:
    if key not in outputs.get(step, {}):
        have = ", ".join(sorted(outputs.get(step, {}))) or "none"
        raise StepFailed(f"step {step!r} has no output {key!r} (outputs: {have})")
    return outputs[step][key]


class PipelineRunner(StepKinds):
    """Runs one pipeline once; :meth:`run` answers the recorded pipeline run."""

    def __init__(
        self,
        spec: PipelineSpec,
        *,
        engine: Engine,
        datasets: DatasetStore,
        providers: dict[str, Any],
        data_dir: str,
        url: str,
        api_key: str | None,
        config_path: str | None = None,
        file: str | None = None,
        force: bool = False,
        from_step: str | None = None,
        trigger_kind: str = "cli",
        trigger_reason: str | None = None,
        run_id: str | None = None,
        created_by: str | None = None,
        out: TextIO | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.engine = engine
        self.datasets = datasets
        self.providers = providers
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.api = ApiClient(self.url, api_key)
        self.config_path = config_path
        self.environ = environ if environ is not None else dict(os.environ)
        if from_step is not None and from_step not in spec.order:
            raise InvalidRequest(
                f"--from {from_step}: no such step (steps: {', '.join(spec.order)})"
            )
        self.forced = self._downstream(from_step) if from_step else set()
        self.force = force
        self.out = out or sys.stdout
        self._lock = threading.Lock()
        if run_id is None:
            run_id = record.create_run(
                engine,
                spec.name,
                file=file,
                trigger_kind=trigger_kind,
                trigger_reason=trigger_reason,
                created_by=created_by,
            )
        else:  # a trigger made the row (queued) and started this process for it
            record.update_run(engine, run_id, status="running", started_at_ms=now_ms())
        self.run_id = run_id
        logs = Path(data_dir) / "pipelines"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"{run_id}.log"
        self._logf = self.log_path.open("a", encoding="utf-8")
        record.update_run(engine, run_id, log_path=str(self.log_path))
        self.links: dict[str, list[Any]] = {
            "runs": [],
            "datasets": [],
            "eval_runs": [],
            "registered": [],
            "fine_tuned_models": [],
        }

    def _downstream(self, name: str) -> set[str]:
        out = {name}
        for n in self.spec.order:  # topological: dependents come after their deps
            if any(d in out for d in self.spec.deps[n]):
                out.add(n)
        return out

    # -- logging -------------------------------------------------------------

    def log(self, step: str, line: str) -> None:
        text = f"[{step}] {line}"
        with self._lock:
            print(text, file=self.out, flush=True)
            self._logf.write(text + "\n")
            self._logf.flush()

    # -- the run -------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run every step; the pipeline run as recorded (status succeeded or failed)."""
        spec = self.spec
        for i, name in enumerate(spec.order):
            s = spec.step(name)
            record.put_step(
                self.engine, self.run_id, name, kind=s.kind, position=i, status="pending"
            )
        outputs: dict[str, dict[str, Any]] = {}
        failed: str | None = None
        error: str | None = None
        try:
            for name in spec.order:
                if failed is not None:
                    record.put_step(self.engine, self.run_id, name, status="not_run")
                    continue
                try:
                    outputs[name] = self._step(name, outputs)
                except KeelError as e:
                    failed, error = name, str(e)
                except Exception as e:  # a bug or an OS error: still a clear, recorded failure
                    failed, error = name, f"{type(e).__name__}: {e}"
                if failed is not None:
                    self.log(name, f"FAILED: {error}")
                    record.put_step(
                        self.engine,
                        self.run_id,
                        name,
                        status="failed",
                        error=error,
                        ended_at_ms=now_ms(),
                    )
        except BaseException as e:  # Ctrl-C: the row must not stay "running"
            record.update_run(
                self.engine,
                self.run_id,
                status="failed",
                ended_at_ms=now_ms(),
                error=f"interrupted ({type(e).__name__})",
                links=self.links,
            )
            raise
        finally:
            self._logf.close()
            self.api.close()
        status = "failed" if failed else "succeeded"
        err = f"step {failed!r} failed: {error}" if failed else None
        record.update_run(
            self.engine,
            self.run_id,
            status=status,
            error=err,
            ended_at_ms=now_ms(),
            links=self.links,
        )
        return record.get_run(self.engine, self.run_id)

    def _step(self, name: str, outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        s = self.spec.step(name)
        fields = substitute(s.model_dump(exclude={"name", "needs", "inputs"}), outputs)
        h = self._input_hash(s, fields)
        if not self.force and name not in self.forced:
            prev = record.reusable_step(self.engine, self.spec.name, name, h)
            if prev is not None:
                self.log(
                    name,
                    f"skipped: inputs unchanged since pipeline run {prev['pipeline_run_id'][:12]}",
                )
                out = prev["outputs"] or {}
                record.put_step(
                    self.engine,
                    self.run_id,
                    name,
                    status="skipped",
                    input_hash=h,
                    outputs=out,
                    reused_from=prev["pipeline_run_id"],
                    started_at_ms=now_ms(),
                    ended_at_ms=now_ms(),
                )
                self._link(s.kind, out)
                return out
        self.log(name, f"running ({s.kind})")
        record.put_step(
            self.engine, self.run_id, name, status="running", input_hash=h, started_at_ms=now_ms()
        )
        fn: Callable[[str, dict[str, Any]], dict[str, Any]] = getattr(
            self, "_" + s.kind.replace("-", "_")
        )
        out = fn(name, fields)
        record.put_step(
            self.engine, self.run_id, name, status="succeeded", outputs=out, ended_at_ms=now_ms()
        )
        self._link(s.kind, out)
        self.log(name, "succeeded")
        return out

    def _link(self, kind: str, out: dict[str, Any]) -> None:
        L = self.links
        if out.get("run_id"):
            L["runs"].append(out["run_id"])
        if out.get("dataset"):
            L["datasets"].append(out["dataset"])
        L["eval_runs"] += out.get("eval_runs") or []
        if kind == "register" and out.get("ref"):
            L["registered"].append(out["ref"])
        if out.get("fine_tuned_model"):
            L["fine_tuned_models"].append(out["fine_tuned_model"])

    def _path(self, p: str) -> Path:
        return (self.spec.base_dir / p).resolve()

    def _input_hash(self, s: Any, fields: dict[str, Any]) -> str:
        files = list(s.inputs)
        for key in ("file", "suite", "card"):
            if fields.get(key):
                files.append(fields[key])
        # the command's own script, when it is a file next to the pipeline
        cmd = fields.get("command")
        argv = cmd.split() if isinstance(cmd, str) else (cmd or [])
        files += [a for a in argv if a.endswith(".py") and self._path(a).is_file()]
        content = {f: hash_path(self._path(f)) for f in sorted(set(files))}
        refs: list[str] = list(fields.get("datasets") or [])
        if s.kind in ("finetune",) or (s.kind == "validate-data" and not fields.get("file")):
            refs.append(fields["dataset"])
        versions = {r: self.datasets.get(r).id for r in refs}
        doc = {"kind": s.kind, "fields": fields, "files": content, "datasets": versions}
        return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {"KEEL_URL": self.url, "KEEL_PIPELINE_RUN_ID": self.run_id, **extra}
        if self.api_key:
            env["KEEL_API_KEY"] = self.api_key
        return env

    def _cli(self, name: str, args: list[str]) -> int:
        cfg = ["--config", self.config_path] if self.config_path else []
        return run_local(
            [*KEEL_CLI, *args, *cfg],
            cwd=self.spec.base_dir,
            env=self._env({}),
            log=lambda m: self.log(name, m),
            timeout_s=24 * 3600,
        )
