"""What each step kind does (mixed into :class:`keel.pipelines.runner.PipelineRunner`).

Every method takes the step's name and its resolved fields and answers the
step's outputs, or raises :class:`StepFailed` with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
import yaml

from keel.daemon import now_ms
from keel.errors import KeelError
from keel.pipelines.executors import run_command
from keel.pipelines.finetune import run_finetune, training_lines

KEEL_CLI_ARGS = ("-c", "from keel.cli import main; main()")


class StepFailed(KeelError):
    """A step that ran and failed; the message says why."""

    status = 422
    type = "step_failed"


class StepKinds:
    """validate-data, train, finetune, evaluate, register."""

    spec: Any
    api: Any
    datasets: Any
    providers: dict[str, Any]
    environ: dict[str, str]
    run_id: str
    url: str
    config_path: str | None

    def log(self, step: str, line: str) -> None:  # pragma: no cover - the runner's
        raise NotImplementedError

    def _path(self, p: str) -> Path:  # pragma: no cover - the runner's
        raise NotImplementedError

    def _env(self, extra: dict[str, str]) -> dict[str, str]:  # pragma: no cover
        raise NotImplementedError

    def _cli(self, name: str, args: list[str]) -> int:  # pragma: no cover
        raise NotImplementedError

    def _validate_data(self, name: str, f: dict[str, Any]) -> dict[str, Any]:
        # A file is checked before it is imported: a failing file never becomes a version.
        if f.get("file"):
            path = self._path(f["file"])
            self._checks(name, [str(path), "--kind", f["data_kind"]], f["fail_on"], path.name)
            from keel.data.io import canonical_rows, read_file

            rows = canonical_rows(read_file(str(path)), f["data_kind"])
            v = self.datasets.write_version(
                f["dataset"].partition("@")[0],
                f["data_kind"],
                rows,
                created_by=f"pipeline:{self.run_id}",
                source={"type": "file", "path": str(path), "pipeline_run_id": self.run_id},
            )
            what = "imported" if v.created else "unchanged"
            self.log(name, f"{what} {v.dataset}@{v.id[:12]} ({v.rows} rows)")
        else:
            v = self.datasets.get(f["dataset"])
            ref = f"{v.dataset}@{v.id}"
            self._checks(name, [ref], f["fail_on"], f"dataset {v.dataset}@{v.id[:12]}")
        return {"dataset": f"{v.dataset}@{v.id}", "version_id": v.id, "rows": v.rows}

    def _checks(self, name: str, args: list[str], fail_on: str, what: str) -> None:
        rc = self._cli(name, ["data", "validate", *args, "--fail-on", fail_on])
        if rc == 1:
            raise StepFailed(f"{what} has {fail_on}-level findings (see the report above)")
        if rc != 0:
            raise StepFailed(f"`keel data validate` exited with status {rc}")

    def _tracked(self, name: str, f: dict[str, Any], what: str) -> dict[str, Any]:
        """Run a command against a pending run made for it; the run's outcome."""
        run = self.api.request(
            "POST",
            "/api/runs",
            json={
                "name": f"{self.spec.name}.{name}",
                "experiment": self.spec.name,
                "pipeline_run_id": self.run_id,
                "status": "pending",
                "params": f.get("params") or None,
            },
        )
        rid = run["id"]
        self.log(name, f"run {rid} created")
        if f.get("datasets"):
            try:
                self.api.request(
                    "POST", f"/api/runs/{rid}/inputs", json={"datasets": f["datasets"]}
                )
            except KeelError as e:
                if e.status != 404:
                    raise
                # The runner reads and writes datasets in its own store; Keel's API
                # looks in the server's. Different stores is the usual cause.
                raise KeelError(
                    f"{e} on the Keel server: `keel pipeline run` and `keel up` must use "
                    "the same store (run both from the same directory, or set the same "
                    "KEEL_DATA_DIR / KEEL_DATABASE_URL)",
                    status=404,
                ) from None
        env = self._env(
            {
                "KEEL_RUN_ID": rid,
                "KEEL_PARAMS": orjson.dumps(f.get("params") or {}).decode(),
                **f.get("env", {}),
            }
        )
        rc = run_command(
            f["executor"],
            f["command"],
            cwd=self.spec.base_dir,
            env=env,
            log=lambda m: self.log(name, m),
            timeout_s=f["timeout_s"],
            ray_address=f.get("ray_address"),
        )
        got = self.api.request("GET", f"/api/runs/{rid}")
        if rc != 0:
            if got["status"] in ("pending", "running"):
                self.api.request(
                    "PATCH",
                    f"/api/runs/{rid}",
                    json={
                        "status": "failed",
                        "error": f"{what} command exited with status {rc}",
                        "ended_at_ms": now_ms(),
                    },
                )
            raise StepFailed(f"{what} command exited with status {rc} (run {rid})")
        if got["status"] in ("pending", "running"):  # a command that did not use keel.run
            if got["status"] == "pending":
                self.api.request("PATCH", f"/api/runs/{rid}", json={"status": "running"})
            got = self.api.request(
                "PATCH", f"/api/runs/{rid}", json={"status": "finished", "ended_at_ms": now_ms()}
            )
        elif got["status"] != "finished":
            raise StepFailed(f"run {rid} ended {got['status']}: {got.get('error') or ''}".strip())
        metrics = {
            k: p["value"]
            for k, p in (got.get("metrics") or {}).items()
            if not k.startswith("system/")
        }
        arts = sorted({a["path"].split("/")[0] for a in got.get("artifacts") or []})
        return {"run_id": rid, "metrics": metrics, "artifacts": arts}

    def _train(self, name: str, f: dict[str, Any]) -> dict[str, Any]:
        return self._tracked(name, f, "the training")

    def _evaluate(self, name: str, f: dict[str, Any]) -> dict[str, Any]:
        if f.get("command") is not None:
            out = self._tracked(name, f, "the evaluation")
            gates, bad = [], []
            for metric, minimum in f["thresholds"].items():
                v = out["metrics"].get(metric)
                ok = v is not None and v >= minimum
                gates.append({"metric": metric, "value": v, "threshold": minimum, "passed": ok})
                self.log(name, f"gate {metric}: {v} >= {minimum}: {'pass' if ok else 'FAIL'}")
                if not ok:
                    bad.append(f"{metric} {v if v is not None else 'missing'} < {minimum}")
            if bad:
                raise StepFailed(f"evaluation gate failed: {', '.join(bad)} (run {out['run_id']})")
            return {**out, "gates": gates}
        return self._suite(name, f)

    def _suite(self, name: str, f: dict[str, Any]) -> dict[str, Any]:
        suite = self._path(f["suite"])
        with tempfile.TemporaryDirectory() as tmp:
            if f.get("model"):  # the same suite against another model (a fine-tuned one)
                doc = yaml.safe_load(suite.read_text(encoding="utf-8"))
                for t in doc.get("targets") or []:
                    t["model"] = f["model"]
                suite = Path(tmp) / suite.name
                suite.write_text(yaml.safe_dump(doc), encoding="utf-8")
            args = ["eval", "run", str(suite), "--quiet", "--json", "--url", self.url]
            for metric, minimum in f["thresholds"].items():
                args += ["--fail-under", f"{metric}={minimum}"]
            rc, runs = self._eval_cli(name, args)
        ids = [r["id"] for r in runs]
        gates = [g for r in runs for g in r.get("gates") or []]
        if rc != 0:
            bad = [
                f"{g['metric']} {g.get('value')} < {g.get('threshold')}"
                for g in gates
                if not g.get("passed")
            ]
            raise StepFailed(
                "evaluation gate failed: " + ", ".join(bad)
                if bad
                else f"`keel eval run` exited with status {rc}"
            )
        return {
            "eval_runs": ids,
            "gates": gates,
            "summary": {r.get("target"): r.get("summary") for r in runs},
        }

    def _eval_cli(self, name: str, args: list[str]) -> tuple[int, list[dict[str, Any]]]:
        # `keel eval run --json` prints the runs on stdout: keep them, log stderr.
        cfg = ["--config", self.config_path] if self.config_path else []
        p = subprocess.run(
            [sys.executable, *KEEL_CLI_ARGS, *args, *cfg],
            cwd=self.spec.base_dir,
            env={**os.environ, **self._env({})},
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
        )
        for line in p.stderr.splitlines():
            self.log(name, line)
        try:
            runs = orjson.loads(p.stdout) if p.stdout.strip().startswith("[") else []
        except orjson.JSONDecodeError:
            runs = []
        for r in runs:
            self.log(name, f"eval run {r['id']} ({r.get('target')}): {r.get('status')}")
        return p.returncode, runs

    def _finetune(self, name: str, f: dict[str, Any]) -> dict[str, Any]:
        prov = self.providers.get(f["provider"])
        if prov is None or not prov.base_url:
            have = ", ".join(sorted(self.providers)) or "none"
            raise StepFailed(
                f"no provider {f['provider']!r} with a base_url in keel.yaml (providers: {have})"
            )
        key = self.environ.get(prov.api_key_env) if prov.api_key_env else None
        v = self.datasets.get(f["dataset"])
        data = training_lines(self.datasets.read_rows(v))
        res = run_finetune(
            prov.base_url,
            key,
            data,
            model=f["base_model"],
            suffix=f.get("suffix"),
            hyperparameters=f.get("hyperparameters") or None,
            poll_s=f["poll_s"],
            max_poll_s=f["max_poll_s"],
            timeout_s=f["timeout_s"],
            log=lambda m: self.log(name, m),
        )
        self.log(name, f"fine-tuned model: {res.fine_tuned_model}")
        return {
            "fine_tuned_model": res.fine_tuned_model,
            "job_id": res.job_id,
            "file_id": res.file_id,
            "provider": f["provider"],
            "dataset": f"{v.dataset}@{v.id}",
        }

    def _register(self, name: str, f: dict[str, Any]) -> dict[str, Any]:
        card = self._path(f["card"]).read_text(encoding="utf-8") if f.get("card") else None
        desc = f.get("description") or f"pipeline {self.spec.name}, run {self.run_id}"
        body = {
            "run_id": f.get("run"),
            "artifact": f.get("artifact"),
            "deployment": f.get("deployment"),
            "card": card,
            "description": desc,
        }
        v = self.api.request("POST", f"/api/registry/models/{f['model']}/versions", json=body)
        ref = f"{v['model']}@{v['version']}"
        self.log(name, f"registered {ref} (candidate)")
        return {"model": v["model"], "version": v["version"], "ref": ref}
