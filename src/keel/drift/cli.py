"""``keel drift``: list runs, print a run's report, run a monitor now.

Every command works on the store directly (like ``keel data``), with the
monitors of the same ``keel.yaml``: ``keel drift run`` computes where it is
typed, so it works while Keel is down, needs no admin key, and shows a
progress bar while a dataset reference is featurized. The run is stored like
the daemon's, so the API, the dashboard and the alert signals see it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
import orjson

from keel.drift.runs import get_run, latest_run, list_runs

if TYPE_CHECKING:
    from keel.drift.monitor import DriftRunner

# scipy (the statistical tests) is imported only by the commands that compute or
# render a report, so `keel` itself starts fast.

config_option = click.option(
    "--config", "config", default=None, help="keel.yaml [default: ./keel.yaml if present]."
)


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a Keel error becomes one line and exit 1."""
    from keel.cli import _fail
    from keel.errors import KeelError

    try:
        return fn(*args, **kwargs)
    except KeelError as e:
        _fail(str(e))


def _runner(config: str | None) -> DriftRunner:
    from keel.cli import _settings
    from keel.data.versions import DatasetStore
    from keel.drift.monitor import DriftRunner, make_embedder
    from keel.store.engine import make_engine, migrate

    s = _settings(config)
    engine = make_engine(s.effective_database_url)
    _call(migrate, engine)
    embedder = make_embedder(s.drift, s.local.embed_model_dir, s.local.enabled)
    return DriftRunner(engine, s.drift, embedder, DatasetStore(engine, s.artifact_root))


def _json(value: Any) -> None:
    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


@click.group("drift")
def drift() -> None:
    """Drift monitors: what changed in the traffic, compared with a reference."""


@drift.command("list")
@click.option("--monitor", default=None, help="Only this monitor.")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@config_option
def list_cmd(monitor: str | None, limit: int, as_json: bool, config: str | None) -> None:
    """Configured monitors and recent runs, newest first."""
    runner = _runner(config)
    runs = _call(list_runs, runner.engine, monitor, limit)
    if as_json:
        _json({"monitors": [m.name for m in runner.settings.monitors], "runs": runs})
        return
    names = [m.name for m in runner.settings.monitors]
    click.echo(f"monitors: {', '.join(names) or 'none configured (drift.monitors in keel.yaml)'}")
    if not runs:
        click.echo("no drift runs yet: they appear every monitor interval, or run `keel drift run`")
        return
    fmt = "{:<32}  {:<16}  {:<19}  {:<17}  {:>7}  {:>7}  {}"
    click.echo(fmt.format("ID", "MONITOR", "COMPUTED (UTC)", "STATUS", "CURRENT", "REF", "DRIFTED"))
    for r in runs:
        status = "drifted" if r["drifted"] else r["status"]
        click.echo(
            fmt.format(
                r["id"],
                r["monitor"][:16],
                _when(r["computed_at_ms"]),
                status,
                r["n_current"],
                r["n_reference"],
                ", ".join(r["drifted_features"]) or "-",
            )
        )


@drift.command("report")
@click.argument("monitor", required=False)
@click.option("--run", "run_id", default=None, help="A run id (default: the latest run).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole run as JSON.")
@config_option
def report_cmd(monitor: str | None, run_id: str | None, as_json: bool, config: str | None) -> None:
    """What moved in MONITOR's latest run (or --run ID; or every monitor's latest)."""
    from keel.cli import _fail

    runner = _runner(config)
    if run_id:
        runs = [_call(get_run, runner.engine, run_id)]
    else:
        names = [monitor] if monitor else [m.name for m in runner.settings.monitors]
        if not names:
            latest = _call(list_runs, runner.engine, None, 1)
            names = [latest[0]["monitor"]] if latest else []
        runs = [r for n in names if (r := _call(latest_run, runner.engine, n, full=True))]
        if not runs:
            what = f"monitor '{monitor}'" if monitor else "any monitor"
            _fail(f"no drift run of {what} yet; compute one with `keel drift run MONITOR`")
    if as_json:
        _json(runs[0] if len(runs) == 1 else runs)
        return
    from keel.drift.report import render_text

    click.echo("\n\n".join(render_text(r) for r in runs))


@drift.command("run")
@click.argument("monitor")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@config_option
def run_cmd(monitor: str, as_json: bool, quiet: bool, config: str | None) -> None:
    """Compute MONITOR's run now (on the store), store it and print its report."""
    from tqdm import tqdm

    runner = _runner(config)
    _, m = _call(runner.monitor, monitor)
    featurizes = m.reference.kind == "dataset"
    with tqdm(
        desc="featurizing the reference dataset",
        unit="row",
        disable=quiet or not featurizes,
        leave=False,
    ) as bar:
        done = _call(runner.run, monitor, progress=bar.update)
    run = _call(get_run, runner.engine, done["id"])
    if as_json:
        _json(run)
        return
    from keel.drift.report import render_text

    click.echo(render_text(run))
