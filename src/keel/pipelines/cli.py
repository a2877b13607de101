"""``keel pipeline`` (run, runs, show) and ``keel ci init github``."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from keel._cli_util import cli_user as _user
from keel.errors import KeelError

DEFAULT_URL = "http://127.0.0.1:4000"
config_option = click.option(
    "--config", "config", default=None, help="keel.yaml [default: ./keel.yaml if present]."
)


def _fail(msg: str) -> None:
    from keel.cli import _fail as fail

    fail(msg)


def _open(config: str | None) -> tuple[Any, Any]:
    from keel.cli import _settings
    from keel.store.engine import make_engine, migrate

    s = _settings(config)
    engine = make_engine(s.effective_database_url)
    try:
        migrate(engine)
    except KeelError as e:
        _fail(str(e))
    return s, engine


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def report_text(run: dict[str, Any]) -> str:
    """The end-of-run report: each step's status, the links, the outcome."""
    lines = [f"pipeline {run['pipeline']} run {run['id']}: {run['status']}"]
    trig = run["trigger_kind"] + (f" ({run['trigger_reason']})" if run["trigger_reason"] else "")
    lines.append(f"  trigger: {trig}")
    for s in run["steps"]:
        extra = ""
        if s["status"] == "skipped" and s["reused_from"]:
            extra = f"  (unchanged; outputs of {s['reused_from'][:12]})"
        elif s["status"] == "failed":
            extra = f"  {s['error']}"
        lines.append(f"  {s['name']:<20} {s['kind']:<14} {s['status']:<10}{extra}")
    for k, v in (run["links"] or {}).items():
        if v:
            lines.append(f"  {k}: {', '.join(str(x) for x in v)}")
    if run["log_path"]:
        lines.append(f"  log: {run['log_path']}")
    if run["error"]:
        lines.append(f"  error: {run['error']}")
    return "\n".join(lines)


@click.group("pipeline")
def pipeline() -> None:
    """Pipelines: validate data, train, evaluate, register — skipping unchanged steps."""


@pipeline.command("run")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Run every step, even unchanged ones.")
@click.option("--from", "from_step", default=None, help="Rerun this step and all after it.")
@click.option("--url", envvar="KEEL_URL", default=DEFAULT_URL, show_default=True,
              help="Keel's API [env: KEEL_URL]; the key is KEEL_API_KEY.")  # fmt: skip
@click.option("--trigger", "trigger_kind", default="cli", hidden=True)
@click.option("--trigger-reason", default=None, hidden=True)
@click.option("--run-id", "run_id", default=None, hidden=True, help="A queued run to adopt.")
@config_option
def run_cmd(
    file: str, force: bool, from_step: str | None, url: str, trigger_kind: str,
    trigger_reason: str | None, run_id: str | None, config: str | None,
) -> None:  # fmt: skip
    """Run FILE (pipeline.yaml); exit 1 when a step fails."""
    from keel.data.versions import DatasetStore
    from keel.pipelines.runner import PipelineRunner
    from keel.pipelines.spec import load_pipeline

    try:
        spec = load_pipeline(file)
    except KeelError as e:
        _fail(str(e))
        return
    if trigger_kind == "cli" and os.environ.get("CI"):
        trigger_kind = "ci"
    settings, engine = _open(config)
    try:
        runner = PipelineRunner(
            spec,
            engine=engine,
            datasets=DatasetStore(engine, settings.artifact_root, progress=False),
            providers=settings.providers,
            data_dir=settings.data_dir,
            url=url,
            api_key=os.environ.get("KEEL_API_KEY") or None,
            config_path=config,
            file=str(Path(file).resolve()),
            force=force,
            from_step=from_step,
            trigger_kind=trigger_kind,
            trigger_reason=trigger_reason,
            run_id=run_id,
            created_by=_user(),
        )
        run = runner.run()
    except KeelError as e:
        _fail(str(e))
        return
    click.echo(report_text(run))
    if run["status"] != "succeeded":
        sys.exit(1)


@pipeline.command("runs")
@click.option("--pipeline", "name", default=None, help="Only this pipeline.")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@config_option
def runs_cmd(name: str | None, limit: int, config: str | None) -> None:
    """Pipeline runs, newest first."""
    from keel.pipelines.record import list_runs

    _, engine = _open(config)
    rows = list_runs(engine, pipeline=name, limit=limit)
    if not rows:
        click.echo("no pipeline runs")
        return
    for r in rows:
        reg = ", ".join((r["links"] or {}).get("registered") or [])
        click.echo(
            f"{r['id']}  {r['pipeline']:<24} {r['status']:<10} {r['trigger_kind']:<9}"
            f"{_when(r['created_at_ms'])}  {reg}".rstrip()
        )


@pipeline.command("show")
@click.argument("run_id")
@config_option
def show_cmd(run_id: str, config: str | None) -> None:
    """One pipeline run: steps, trigger, links (runs, datasets, registered version)."""
    from keel.pipelines.record import get_run

    _, engine = _open(config)
    try:
        click.echo(report_text(get_run(engine, run_id)))
    except KeelError as e:
        _fail(str(e))


@click.group("ci")
def ci() -> None:
    """Continuous integration: write a workflow for the Keel flow."""


@ci.group("init")
def ci_init() -> None:
    """Write a CI workflow."""


@ci_init.command("github")
@click.option("--force", is_flag=True, help="Overwrite an existing workflow.")
@click.option("--pipeline", "pipeline_file", default="pipeline.yaml", show_default=True)
@click.option("--suite", default="evals/suite.yaml", show_default=True, help="Eval gate suite.")
@click.option("--dataset", default="data/train.jsonl", show_default=True,
              help="Dataset file validated on pull requests.")  # fmt: skip
@click.option("--dir", "root", default=".", show_default=True, help="Repository root.")
def ci_github(force: bool, pipeline_file: str, suite: str, dataset: str, root: str) -> None:
    """Write .github/workflows/keel.yml: PRs lint, test, validate data and gate on evals;
    pushes to the main branch run the pipeline and register a candidate."""
    from keel.pipelines.ci import github_workflow

    dest = Path(root) / ".github" / "workflows" / "keel.yml"
    if dest.exists() and not force:
        _fail(f"{dest} exists; pass --force to overwrite it")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(github_workflow(pipeline_file, suite, dataset), encoding="utf-8")
    except OSError as e:
        _fail(f"cannot write {dest}: {e.strerror or e}")
    click.echo(f"wrote {dest}; set the KEEL_URL and KEEL_API_KEY secrets in the repository")
