"""``keel runs``: list, show, compare runs and print metric curves, through the REST API.

Like ``keel traces``, these talk to a running Keel (``--url`` / ``$KEEL_URL``) with
``$KEEL_API_KEY`` when Keel requires a key (a read key is enough).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import click
import orjson

from keel.errors import KeelError
from keel.runs._client import DEFAULT_URL, ApiClient

SPARKS = "▁▂▃▄▅▆▇█"

url_option = click.option(
    "--url",
    envvar="KEEL_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="Keel's address (or KEEL_URL).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def call(
    url: str, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None
) -> Any:
    """One API call with ``$KEEL_API_KEY``; an error becomes one ``error: …`` line, exit 1."""
    from keel.cli import _fail

    api = ApiClient(url, os.environ.get("KEEL_API_KEY"), retries=1, timeout=60)
    try:
        return api.request(method, path, json=json, params=params)
    except KeelError as e:
        _fail(str(e))
    finally:
        api.close()


def echo_json(data: Any) -> None:
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def date(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def duration(ms: float | None) -> str:
    if ms is None:
        return "-"
    s = ms / 1000
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return v if isinstance(v, str) else orjson.dumps(v).decode()


def sparkline(values: list[float | None], width: int = 40) -> str:
    """A one-line curve of ``values`` (resampled to ``width``)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return ""
    if len(vals) > width:
        vals = [vals[round(i * (len(vals) - 1) / (width - 1))] for i in range(width)]
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(SPARKS[min(7, int((v - lo) / span * 8))] for v in vals)


@click.group("runs")
def runs() -> None:
    """Tracked runs: parameters, metric curves, artifacts, code and environment."""


@runs.command("list")
@url_option
@click.option("--name", default=None, help="Only runs with this name.")
@click.option("--experiment", default=None, help="Only runs of this experiment.")
@click.option("--status", type=click.Choice(["pending", "running", "finished", "failed", "killed"]))
@click.option("--limit", type=int, default=20, show_default=True)
@json_option
def list_cmd(
    url: str,
    name: str | None,
    experiment: str | None,
    status: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Runs, newest first."""
    params = {"name": name, "experiment": experiment, "status": status, "limit": limit}
    data = call(url, "GET", "/api/runs", params=params)["data"]
    if as_json:
        echo_json(data)
        return
    if not data:
        click.echo("no runs yet: use `with keel.run(...)` in a training script")
        return
    rows = [("ID", "NAME", "EXPERIMENT", "STATUS", "STARTED (UTC)", "DURATION")]
    for r in data:
        rows.append(
            (
                r["id"],
                r["name"],
                r["experiment"] or "-",
                r["status"],
                date(r["started_at_ms"]),
                duration(r["duration_ms"]),
            )
        )
    table(rows)


@runs.command("show")
@click.argument("run_id")
@url_option
@json_option
def show_cmd(run_id: str, url: str, as_json: bool) -> None:
    """One run: status, code version, parameters, final metrics, inputs, artifacts."""
    r = call(url, "GET", f"/api/runs/{run_id}")
    if as_json:
        echo_json(r)
        return
    click.echo(f"run {r['id']}  {r['name']}  [{r['status']}]  {duration(r['duration_ms'])}")
    click.echo(
        f"  started {date(r['started_at_ms'])} UTC on {r['host'] or '?'}"
        + (f", experiment {r['experiment']}" if r["experiment"] else "")
    )
    code = r.get("code")
    if code:
        dirty = " (dirty)" if code.get("dirty") else ""
        click.echo(f"  code: {code['commit'][:12]}{dirty} {code.get('branch') or ''}".rstrip())
    env = r.get("environment") or {}
    if env:
        click.echo(f"  python {env.get('python')}, {len(env.get('packages') or [])} packages")
    if r.get("error"):
        click.echo(f"  error: {r['error'].splitlines()[0][:200]}")
    if r["params"]:
        click.echo("params:")
        for k, v in r["params"].items():
            click.echo(f"  {k} = {fmt(v)}")
    if r["metrics"]:
        click.echo("metrics (last value, step):")
        keys = sorted(r["metrics"], key=lambda k: (k.startswith("system/"), k))
        for k in keys:
            p = r["metrics"][k]
            click.echo(f"  {k} = {fmt(p['value'])}  (step {p['step']})")
    for kind in ("datasets", "prompts"):
        for d in (r.get("inputs") or {}).get(kind, []):
            what = d["id"][:12] if kind == "datasets" else f"v{d['version']}"
            click.echo(f"  {kind[:-1]}: {d['name']}@{what}")
    if r.get("artifacts"):
        click.echo("artifacts:")
        for a in r["artifacts"]:
            click.echo(f"  {a['path']}  ({a['size']} bytes)")


@runs.command("compare")
@click.argument("run_ids", nargs=-1, required=True)
@url_option
@click.option("--curve", "curves", multiple=True, help="Also show this metric's curve per run.")
@click.option("--all", "show_all", is_flag=True, help="Also rows that are the same everywhere.")
@json_option
def compare_cmd(
    run_ids: tuple[str, ...], url: str, curves: tuple[str, ...], show_all: bool, as_json: bool
) -> None:
    """Parameters and final metrics side by side; differing rows are marked '*'."""
    if len(run_ids) < 2:
        from keel.cli import _fail

        _fail("give at least two run ids to compare")
    params = {"ids": ",".join(run_ids), "curves": ",".join(curves) or None}
    c = call(url, "GET", "/api/runs/compare", params=params)
    if as_json:
        echo_json(c)
        return
    heads = [f"{r['name']} {r['id'][-6:]}" for r in c["runs"]]
    rows: list[tuple[str, ...]] = [("", "", *heads)]
    rows.append(("", "status", *(r["status"] for r in c["runs"])))
    rows.append(("", "duration", *(duration(r["duration_ms"]) for r in c["runs"])))
    for section, values, differ in (
        ("param", c["params"], set(c["params_differ"])),
        ("metric", c["metrics"], set(c["metrics_differ"])),
    ):
        for k, vals in values.items():
            if k in differ or show_all:
                rows.append(("*" if k in differ else "", f"{section} {k}", *map(fmt, vals)))
    table(rows)
    for key, per_run in c["curves"].items():
        click.echo(f"\n{key}:")
        for r, head in zip(c["runs"], heads, strict=True):
            pts = per_run.get(r["id"]) or []
            last = fmt(pts[-1][1]) if pts else "-"
            click.echo(f"  {head:<24} {sparkline([p[1] for p in pts])}  last {last}")


@runs.command("metrics")
@click.argument("run_id")
@url_option
@click.option("--key", "keys", multiple=True, help="Only this metric (repeatable).")
@click.option("--max-points", type=int, default=50, show_default=True, help="Per key.")
@json_option
def metrics_cmd(
    run_id: str, url: str, keys: tuple[str, ...], max_points: int, as_json: bool
) -> None:
    """A run's metric curves: step and value per point, with a sparkline per key."""
    params: dict[str, Any] = {"key": list(keys) or None, "max_points": max(2, max_points)}
    data = call(url, "GET", f"/api/runs/{run_id}/metrics", params=params)["data"]
    if as_json:
        echo_json(data)
        return
    if not data:
        click.echo("no metrics logged" + (f" for {', '.join(keys)}" if keys else ""))
        return
    for k, pts in data.items():
        click.echo(f"{k}  {sparkline([p['value'] for p in pts])}")
        if keys:
            table([("STEP", "VALUE"), *((str(p["step"]), fmt(p["value"])) for p in pts)])
