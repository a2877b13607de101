"""``keel deploy``: status, promote, rollback and list, through Keel's REST API.

Promote and rollback change what every gateway replica serves, so they go
through the running Keel (its auth rules and audit log), never the store
directly. ``KEEL_API_KEY`` carries an approver (or admin) key when auth is on.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
import httpx
import orjson

# keel.cli is imported inside the functions: it registers this group while it loads.
url_option = click.option(
    "--url",
    envvar="KEEL_URL",
    default="http://127.0.0.1:4000",
    show_default=True,
    help="Keel's address (or KEEL_URL).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _call(method: str, url: str, path: str, **kw: Any) -> Any:
    from keel.cli import _auth_headers, _fail

    try:
        r = httpx.request(
            method, f"{url.rstrip('/')}{path}", timeout=30, headers=_auth_headers(), **kw
        )
    except httpx.HTTPError as e:
        _fail(
            f"cannot reach Keel at {url} ({type(e).__name__}); is `keel up` running? "
            "Set --url or KEEL_URL."
        )
    try:
        body = r.json()
    except ValueError:
        body = {}
    if r.status_code >= 400:
        msg = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
        _fail(msg or f"HTTP {r.status_code}")
    return body


def _time(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.2f}%"


def _side(name: str, s: dict[str, Any]) -> str:
    p95 = "-" if s.get("p95_ms") is None else f"{s['p95_ms']:.0f} ms"
    cpr = "-" if s.get("cost_per_request") is None else f"${s['cost_per_request']:.6f}"
    return (
        f"  {name:<9} {s['ref']:<24} {s['requests']:>7} calls  "
        f"errors {_pct(s.get('error_rate')):>7}  p95 {p95:>8}  cost/call {cpr}"
    )


@click.group("deploy")
def deploy() -> None:
    """Gated deployments: validation, canary, promote and rollback of registry versions."""


@deploy.command("status")
@click.argument("model")
@url_option
@json_option
def status(model: str, url: str, as_json: bool) -> None:
    """Where MODEL's deployment stands: state, traffic split, canary vs production."""
    s = _call("GET", url, f"/api/deploy/{model}")
    if as_json:
        click.echo(orjson.dumps(s, option=orjson.OPT_INDENT_2).decode())
        return
    d = s.get("deployment")
    split = s.get("split")
    click.echo(f"model {model} → alias '{s['alias']}'")
    if split:
        line = f"  serving: {split['stable']}"
        if split.get("canary"):
            share = split["canary_share"]
            line += f" ({1 - share:.0%}), canary {split['canary']} ({share:.0%})"
        click.echo(line + f"  [route revision {split['revision']}]")
    else:
        click.echo("  serving: the keel.yaml alias (no route yet)")
    if d:
        base = f"v{d['baseline_version']}" if d.get("baseline_version") else "keel.yaml alias"
        click.echo(
            f"  deployment {d['id']}: v{d['version']} {d['state']} since "
            f"{_time(d['state_since_ms'])} (baseline {base})"
        )
        if d.get("reason"):
            click.echo(f"  reason: {d['reason']}")
    live = s.get("live")
    if live:
        click.echo(f"  canary window {live['elapsed_s']:.0f}/{live['window_s']:.0f} s:")
        click.echo(_side("canary", live["canary"]))
        click.echo(_side("baseline", live["baseline"]))
        click.echo(f"  monitor: {live['decision']['action']}: {live['decision']['reason']}")


def _done(what: str, d: dict[str, Any]) -> None:
    click.echo(f"{what}: {d['model']}@{d['version']} is {d['state']} — {d.get('reason') or ''}")
    click.echo("  every gateway replica follows within deploy.route_poll_interval_s")


@deploy.command("promote")
@click.argument("model")
@click.option("--reason", default=None, help="Why (kept in the deployment's events).")
@url_option
def promote(model: str, reason: str | None, url: str) -> None:
    """Send all of MODEL's traffic to its canary now (approver key)."""
    _done("promoted", _call("POST", url, f"/api/deploy/{model}/promote", json={"reason": reason}))


@deploy.command("rollback")
@click.argument("model")
@click.option("--reason", default=None, help="Why (kept in the deployment's events).")
@url_option
def rollback(model: str, reason: str | None, url: str) -> None:
    """Restore MODEL's previous routing at once, no restart (approver key)."""
    _done(
        "rolled back", _call("POST", url, f"/api/deploy/{model}/rollback", json={"reason": reason})
    )


@deploy.command("list")
@click.option("--model", default=None, help="Only this registry model.")
@click.option("--limit", type=int, default=20, show_default=True)
@url_option
@json_option
def list_(model: str | None, limit: int, url: str, as_json: bool) -> None:
    """Recent deployments, newest first."""
    page = _call(
        "GET",
        url,
        "/api/deploy/deployments",
        params={k: v for k, v in {"model": model, "limit": limit}.items() if v is not None},
    )
    if as_json:
        click.echo(orjson.dumps(page, option=orjson.OPT_INDENT_2).decode())
        return
    rows = page["data"]
    if not rows:
        click.echo("no deployments yet: approve a registry version of a model with deploy settings")
        return
    fmt = "{:<32}  {:<24}  {:<18}  {:<19}  {}"
    click.echo(fmt.format("ID", "VERSION", "STATE", "SINCE (UTC)", "REASON"))
    for d in rows:
        click.echo(
            fmt.format(
                d["id"],
                f"{d['model']}@{d['version']}"[:24],
                d["state"],
                _time(d["state_since_ms"]),
                (d.get("reason") or "")[:80],
            )
        )
