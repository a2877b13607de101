"""``keel eval``: run experiment suites (with the CI gate), compare runs, list and show them.

Experiments call models through a running Keel gateway (``--url`` / ``KEEL_URL``,
key in ``KEEL_API_KEY``) and read datasets and prompts and store runs in the
store of the configured keel.yaml, like ``keel data``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import click
import orjson

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
    """(settings, engine) of the configured store, migrated."""
    from keel.cli import _settings
    from keel.store.engine import make_engine, migrate

    s = _settings(config)
    engine = make_engine(s.effective_database_url)
    try:
        migrate(engine)
    except KeelError as e:
        _fail(str(e))
    return s, engine


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except KeelError as e:
        _fail(str(e))


def _parse_fail_under(pairs: tuple[str, ...], metrics: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        k = k.strip()
        try:
            value = float(v)
        except ValueError:
            value = None
        if not sep or not k or value is None:
            _fail(f"--fail-under takes METRIC=VALUE (e.g. accuracy=0.8), not {p!r}")
        if k not in metrics:
            _fail(f"--fail-under {k}: no such metric in the suite (metrics: {', '.join(metrics)})")
        out[k] = value  # type: ignore[assignment]
    return out


def _preflight(url: str, key: str | None, models: list[str]) -> None:
    """Fail early, with one line, when the gateway is unreachable or lacks a model."""
    import httpx

    headers = {"authorization": f"Bearer {key}"} if key else {}
    root = url.rstrip("/").removesuffix("/v1")
    try:
        resp = httpx.get(f"{root}/v1/models", headers=headers, timeout=10)
    except httpx.HTTPError as e:
        _fail(f"cannot reach Keel at {root} ({type(e).__name__}); start it with `keel up` "
              "or pass --url / set KEEL_URL")  # fmt: skip
        return
    if resp.status_code in (401, 403):
        _fail(f"the gateway at {root} refused the key (HTTP {resp.status_code}); set KEEL_API_KEY")
    if resp.status_code != 200:
        _fail(f"the gateway at {root} answered GET /v1/models with HTTP {resp.status_code}")
    try:
        names = {m.get("id") for m in resp.json().get("data") or []}
    except ValueError:
        return
    missing = [m for m in models if m not in names]
    if missing:
        _fail(f"model {missing[0]!r} is not served by the gateway at {root} "
              f"(available: {', '.join(sorted(n for n in names if n)) or 'none'})")  # fmt: skip


@click.group("eval")
def eval_group() -> None:
    """Experiments: run suites over dataset versions, compare runs, gate CI on thresholds."""


@eval_group.command("run")
@click.argument("suite_file", type=click.Path(dir_okay=False))
@click.option("--url", envvar="KEEL_URL", default=DEFAULT_URL, show_default=True,
              help="Keel gateway the models are called through [env: KEEL_URL].")  # fmt: skip
@click.option("--fresh", is_flag=True, help="Start a new run even if an unfinished one exists.")
@click.option("--no-cache", is_flag=True, help="Call the model even when an output is cached.")
@click.option("--concurrency", type=click.IntRange(1, 512), default=None,
              help="Items in flight [default: the suite's, else evals.concurrency].")  # fmt: skip
@click.option(
    "--fail-under",
    "fail_under",
    multiple=True,
    help="METRIC=VALUE: exit 1 when the metric's mean is lower (adds to thresholds).",
)
@click.option("--junit", "junit", type=click.Path(dir_okay=False), default=None,
              help="Write a JUnit XML report (a testcase per gate).")  # fmt: skip
@click.option("--markdown", "markdown", type=click.Path(dir_okay=False), default=None,
              help="Write a Markdown summary.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@config_option
def run_cmd(
    suite_file: str, url: str, fresh: bool, no_cache: bool, concurrency: int | None,
    fail_under: tuple[str, ...], junit: str | None, markdown: str | None, as_json: bool,
    quiet: bool, config: str | None,
) -> None:  # fmt: skip
    """Run (or resume) SUITE_FILE: one run per target; exit 1 when a threshold fails."""
    from keel.data.versions import DatasetStore
    from keel.evals._transport import gateway_client
    from keel.evals.report import junit_xml, run_text, runs_markdown
    from keel.evals.runner import ExperimentRunner, RunnerOptions
    from keel.evals.runs import RunStore, evaluate_gates
    from keel.evals.suite import load_suite
    from keel.prompts.store import PromptStore

    suite = _call(load_suite, suite_file)
    extra = _parse_fail_under(fail_under, suite.metrics)
    key = os.environ.get("KEEL_API_KEY") or None
    _preflight(url, key, [t.model for t in suite.targets if t.model])
    settings, engine = _open(config)
    conc = concurrency or suite.concurrency or settings.evals.concurrency
    options = RunnerOptions(
        concurrency=conc,
        use_cache=settings.evals.cache_outputs and not no_cache,
        fresh=fresh,
        progress=not quiet and sys.stderr.isatty(),
        created_by=_user(),
    )
    store = RunStore(engine)

    async def main() -> list[Any]:
        client = gateway_client(url, key, concurrency=conc)
        try:
            runner = ExperimentRunner(
                store, DatasetStore(engine, settings.artifact_root), PromptStore(engine), client,
                options, notify=lambda m: click.echo(m, err=True),
            )  # fmt: skip
            return await runner.run(suite)
        finally:
            await client.aclose()

    try:
        outcomes = asyncio.run(main())
    except KeelError as e:
        _fail(str(e))
        return
    except KeyboardInterrupt:
        click.echo(
            f"\ninterrupted: the finished items are stored; run `keel eval run {suite_file}` "
            "again to resume (or --fresh to start over)",
            err=True,
        )
        sys.exit(130)
    thresholds = {**suite.thresholds, **extra}
    results = []
    for o in outcomes:
        run = store.get(o.run_id)
        results.append((run, evaluate_gates(run["summary"] or {}, thresholds)))
    if as_json:
        click.echo(orjson.dumps([{**r, "gates": g} for r, g in results],
                                option=orjson.OPT_INDENT_2).decode())  # fmt: skip
    else:
        for run, gates in results:
            run = {**run, "summary": {**(run["summary"] or {}), "gates": gates}}
            click.echo(run_text(run))
    try:
        if junit:
            Path(junit).write_text(junit_xml(suite.name, results), encoding="utf-8")
        if markdown:
            Path(markdown).write_text(runs_markdown(suite.name, results), encoding="utf-8")
    except OSError as e:
        _fail(f"cannot write the report: {e}")
    failed = [f"{r['target']}: {g['metric']}" for r, gs in results for g in gs if not g["passed"]]
    if failed:
        click.echo(f"gate failed: {', '.join(failed)}", err=True)
        sys.exit(1)


@eval_group.command("compare")
@click.argument("run_a")
@click.argument("run_b")
@click.option("--top", type=click.IntRange(0, 100), default=5, show_default=True,
              help="How many regressions to list.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--markdown", "markdown", type=click.Path(dir_okay=False), default=None,
              help="Also write the comparison as Markdown.")  # fmt: skip
@config_option
def compare_cmd(
    run_a: str, run_b: str, top: int, seed: int, as_json: bool, markdown: str | None,
    config: str | None,
) -> None:  # fmt: skip
    """Compare RUN_B against RUN_A (ids or prefixes): deltas, CI95, p-values, regressions."""
    from keel.evals.report import compare_markdown, compare_runs, compare_text
    from keel.evals.runs import RunStore

    _, engine = _open(config)
    rep = _call(compare_runs, RunStore(engine), run_a, run_b, top=top, seed=seed)
    if as_json:
        click.echo(orjson.dumps(rep, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(compare_text(rep))
    if markdown:
        try:
            Path(markdown).write_text(compare_markdown(rep), encoding="utf-8")
        except OSError as e:
            _fail(f"cannot write {markdown}: {e}")


@eval_group.command("list")
@click.option("--suite", default=None, help="Only runs of this suite.")
@click.option("--status", type=click.Choice(["running", "completed", "failed"]), default=None)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@config_option
def list_cmd(suite: str | None, status: str | None, limit: int, config: str | None) -> None:
    """Experiment runs, newest first."""
    from keel.data.cli import _date
    from keel.evals.runs import RunStore

    _, engine = _open(config)
    runs, _ = _call(RunStore(engine).list, suite=suite, status=status, limit=limit)
    if not runs:
        click.echo("no eval runs (start one with `keel eval run suite.yaml`)")
        return
    rows = [("RUN", "SUITE", "TARGET", "MODEL", "STATUS", "ITEMS", "METRICS", "STARTED")]
    for r in runs:
        ms = ((r.get("summary") or {}).get("metrics")) or {}
        means = " ".join(f"{k}={v['mean']:.3f}" for k, v in ms.items() if v.get("mean") is not None)
        rows.append((r["id"], r["suite"], r["target"], r.get("model") or "-", r["status"],
                     f"{r['items_done']}/{r['items_total']}", means or "-",
                     _date(r["started_at_ms"])))  # fmt: skip
    widths = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    for x in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip())


@eval_group.command("show")
@click.argument("run_id")
@click.option("--items", "n", type=click.IntRange(min=0), default=5, show_default=True,
              help="How many items to print.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="The run (and items) as JSON.")
@config_option
def show_cmd(run_id: str, n: int, as_json: bool, config: str | None) -> None:
    """A run's summary and its first items (RUN_ID: an id or a prefix)."""
    from keel.evals.report import _clip, _input_text, run_text
    from keel.evals.runs import RunStore

    _, engine = _open(config)
    store = RunStore(engine)
    run = _call(store.get, run_id)
    items = store.items(run["id"], limit=n) if n else []
    if as_json:
        click.echo(orjson.dumps({**run, "items": items}, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(run_text(run))
    for it in items:
        sc = " ".join(f"{k}={v.get('value')}" for k, v in (it["scores"] or {}).items())
        flag = " (cached)" if it["cached"] else ""
        click.echo(f"  #{it['idx']} {it['item_key']}{flag}: {_clip(_input_text(it['input']), 80)}")
        out = it["output"] if not it["error"] else "error: " + it["error"]
        click.echo(f"    → {_clip(out, 100)}  [{sc or '-'}]")


_COMMON_OPTIONS = {"threshold": "Passed when the value is ≥ this (every kind has it)."}


@eval_group.command("evaluators")
@click.option("--json", "as_json", is_flag=True, help="As JSON (with each option's schema).")
def evaluators_cmd(as_json: bool) -> None:
    """The evaluator kinds, what each checks, and its options."""
    from keel.evals import evaluators
    from keel.evals.base import EVALUATORS

    evaluators.load_plugins()
    out = []
    for kind in sorted(EVALUATORS):
        cls = EVALUATORS[kind]
        opts = []
        for name, f in cls.Options.model_fields.items():
            default = None if f.is_required() else f.get_default(call_default_factory=True)
            a = f.annotation
            ann = a.__name__ if isinstance(a, type) else str(a).replace("typing.", "")
            desc = f.description or _COMMON_OPTIONS.get(name, "")
            opts.append({"name": name, "type": ann, "required": f.is_required(),
                         "default": default, "description": desc})  # fmt: skip
        out.append({"kind": kind, "description": cls.description, "uses_model": cls.uses_model,
                    "requires_expected": cls.requires_expected, "options": opts})  # fmt: skip
    if as_json:
        click.echo(orjson.dumps(out, option=orjson.OPT_INDENT_2, default=str).decode())
        return
    for e in out:
        tags = [t for t, on in (("calls a model", e["uses_model"]),
                                ("needs expected", e["requires_expected"])) if on]  # fmt: skip
        click.echo(f"{e['kind']}: {e['description']}" + (f" [{', '.join(tags)}]" if tags else ""))
        for o in e["options"]:
            d = "required" if o["required"] else f"default {o['default']!r}"
            click.echo(f"    {o['name']} ({o['type']}, {d}): {o['description']}")


from keel.evals.cli_online import register  # noqa: E402  (online evaluation and feedback)

register(eval_group)
