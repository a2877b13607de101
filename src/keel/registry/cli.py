"""``keel registry``: models, versions, approvals and aliases, through the REST API.

The CLI sends ``$KEEL_API_KEY``, so the server's roles apply: approving needs an
approver key, registering and moving aliases an admin key, reading a read key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
import orjson
import yaml

from keel.runs.cli import call, date, echo_json, fmt, json_option, table, url_option


def _fail(msg: str) -> None:
    from keel.cli import _fail as fail

    fail(msg)


def _p(s: str) -> str:
    return quote(s, safe="")


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        _fail(f"cannot read {what} {path}: {e.strerror or e}")
        raise AssertionError from None  # unreachable


@click.group("registry")
def registry() -> None:
    """Model registry: versions, approvals, aliases (candidate, approved, production…)."""


@registry.command("list")
@url_option
@json_option
def list_cmd(url: str, as_json: bool) -> None:
    """Models with their latest version and aliases."""
    data = call(url, "GET", "/api/registry/models")["data"]
    if as_json:
        echo_json(data)
        return
    if not data:
        click.echo("no models yet: `keel registry register MODEL --run … --artifact …`")
        return
    rows = [("MODEL", "VERSIONS", "LATEST", "ALIASES", "UPDATED (UTC)")]
    for m in data:
        aliases = ", ".join(f"{a}=v{v}" for a, v in m["aliases"].items()) or "-"
        rows.append(
            (
                m["name"],
                str(m["versions"]),
                f"v{m['latest_version']}",
                aliases,
                date(m["updated_at_ms"]),
            )
        )
    table(rows)


def _show_version(v: dict[str, Any]) -> None:
    click.echo(
        f"{v['model']} v{v['version']}  [{v['status']}]  {v['kind']}"
        + (f"  aliases: {', '.join(v['aliases'])}" if v["aliases"] else "")
    )
    click.echo(f"  registered {date(v['created_at_ms'])} UTC by {v['created_by'] or '?'}")
    if v["artifact_uri"]:
        click.echo(f"  artifact: {v['artifact_uri']}")
    if v["deployment"]:
        d = v["deployment"]
        click.echo(
            f"  deployment: {d['provider']}/{d['model']}"
            + (f" prompt {d['prompt']}" if d.get("prompt") else "")
            + (f" params {fmt(d['params'])}" if d.get("params") else "")
        )
    lin = v["lineage"] or {}
    if lin.get("run_id"):
        click.echo(f"  run: {lin['run_id']}")
    for d in lin.get("datasets") or []:
        click.echo(f"  dataset: {d['name']}@{d['id'][:12]}")
    for p in lin.get("prompts") or []:
        click.echo(f"  prompt: {p['name']}@{p['version']}")
    if lin.get("code"):
        click.echo(
            f"  code: {lin['code']['commit'][:12]}"
            + (" (dirty)" if lin["code"].get("dirty") else "")
        )
    for k, val in (v["metrics"] or {}).items():
        click.echo(f"  metric {k} = {fmt(val)}")
    for d in v["decisions"]:
        note = f": {d['note']}" if d["note"] else ""
        click.echo(f"  {d['decision']}d by {d['principal']} at {date(d['ts_ms'])} UTC{note}")
    if v.get("card"):
        click.echo("\n" + v["card"].rstrip())


@registry.command("show")
@click.argument("model")
@click.argument("version", required=False)
@url_option
@json_option
def show_cmd(model: str, version: str | None, url: str, as_json: bool) -> None:
    """A model's versions, or one VERSION (a number or an alias) with its card."""
    if version is not None:
        v = call(url, "GET", f"/api/registry/models/{_p(model)}/versions/{_p(version)}")
        echo_json(v) if as_json else _show_version(v)
        return
    m = call(url, "GET", f"/api/registry/models/{_p(model)}")
    if as_json:
        echo_json(m)
        return
    aliases = ", ".join(f"{a}=v{v}" for a, v in m["aliases"].items()) or "none"
    click.echo(f"{m['name']}  aliases: {aliases}")
    rows = [("VERSION", "KIND", "STATUS", "ALIASES", "REGISTERED (UTC)", "BY", "RUN")]
    for v in m["versions"]:
        rows.append(
            (
                f"v{v['version']}",
                v["kind"],
                v["status"],
                ",".join(v["aliases"]) or "-",
                date(v["created_at_ms"]),
                v["created_by"] or "-",
                v["source_run_id"] or "-",
            )
        )
    table(rows)


@registry.command("register")
@click.argument("model")
@click.option("--run", "run_id", default=None, help="The run the version comes from.")
@click.option("--artifact", default=None, help="The run's artifact (file or directory).")
@click.option(
    "--deployment",
    "deployment",
    default=None,
    help="deploy.yaml: provider, model, prompt, params (a served/API model).",
)
@click.option("--card", default=None, help="Model card (a Markdown file).")
@click.option("--metrics", default=None, help="JSON object, e.g. '{\"accuracy\": 0.91}'.")
@click.option("--description", default=None)
@url_option
def register_cmd(
    model: str,
    run_id: str | None,
    artifact: str | None,
    deployment: str | None,
    card: str | None,
    metrics: str | None,
    description: str | None,
    url: str,
) -> None:
    """Register a new version of MODEL: --run RUN --artifact NAME, or --deployment FILE."""
    if (artifact is None) == (deployment is None):
        _fail("give either --run RUN_ID --artifact NAME or --deployment deploy.yaml")
    if artifact is not None and run_id is None:
        _fail("--artifact needs --run RUN_ID (the run that stored it)")
    body: dict[str, Any] = {"run_id": run_id, "artifact": artifact, "description": description}
    if deployment is not None:
        try:
            body["deployment"] = yaml.safe_load(_read(deployment, "deployment file"))
        except yaml.YAMLError as e:
            _fail(f"{deployment}: invalid YAML: {str(e).splitlines()[0]}")
    if card is not None:
        body["card"] = _read(card, "model card")
    if metrics is not None:
        try:
            body["metrics"] = orjson.loads(metrics)
        except orjson.JSONDecodeError as e:
            _fail(f"--metrics is not JSON: {e}")
    v = call(url, "POST", f"/api/registry/models/{_p(model)}/versions", json=body)
    click.echo(f"registered {v['model']} v{v['version']} ({v['kind']}, {v['status']})")


@registry.command("approve")
@click.argument("model")
@click.argument("version")
@click.option("--note", default=None, help="Why (recorded with the approval).")
@url_option
def approve_cmd(model: str, version: str, note: str | None, url: str) -> None:
    """Approve a candidate VERSION (needs an approver key); moves the 'approved' alias."""
    path = f"/api/registry/models/{_p(model)}/versions/{_p(version)}/approve"
    v = call(url, "POST", path, json={"note": note})
    click.echo(f"approved {v['model']} v{v['version']}")


@registry.command("reject")
@click.argument("model")
@click.argument("version")
@click.option("--note", required=True, help="Why (required).")
@url_option
def reject_cmd(model: str, version: str, note: str, url: str) -> None:
    """Reject a candidate VERSION (needs an approver key)."""
    path = f"/api/registry/models/{_p(model)}/versions/{_p(version)}/reject"
    v = call(url, "POST", path, json={"note": note})
    click.echo(f"rejected {v['model']} v{v['version']}")


@registry.command("alias")
@click.argument("model")
@click.argument("alias")
@click.argument("version", required=False)
@click.option("--delete", is_flag=True, help="Remove the alias.")
@click.option("--note", default=None, help="Why (recorded in the audit log).")
@url_option
def alias_cmd(
    model: str, alias: str, version: str | None, delete: bool, note: str | None, url: str
) -> None:
    """Point ALIAS (production, a custom name…) at VERSION, or --delete it."""
    path = f"/api/registry/models/{_p(model)}/aliases/{_p(alias)}"
    if delete == (version is not None):
        _fail("give a VERSION to point the alias at, or --delete")
    if delete:
        call(url, "DELETE", path, params={"note": note})
        click.echo(f"removed alias {alias} of {model}")
        return
    r = call(url, "PUT", path, json={"version": version, "note": note})
    if not r["changed"]:
        click.echo(f"{model}: {alias} already points at v{r['version']}")
        return
    for name, m in r["moved"].items():
        was = f"v{m['from']}" if m["from"] is not None else "unset"
        click.echo(f"{model}: {name} v{m['to']} (was {was})")


@registry.command("audit")
@click.argument("model", required=False)
@click.option("--limit", type=int, default=50, show_default=True)
@url_option
@json_option
def audit_cmd(model: str | None, limit: int, url: str, as_json: bool) -> None:
    """Registry changes and refused attempts (who, what, when, why), newest first."""
    data = call(url, "GET", "/api/registry/audit", params={"model": model, "limit": limit})["data"]
    if as_json:
        echo_json(data)
        return
    if not data:
        click.echo("no registry changes recorded")
        return
    rows = [("WHEN (UTC)", "WHO", "WHAT", "TARGET", "STATUS", "NOTE")]
    for a in data:
        d = a["details"] or {}
        rows.append(
            (
                date(a["ts_ms"]),
                a["principal"],
                a["action"],
                a["target"] or "-",
                str(a["status"] or "ok"),
                (d.get("note") or "")[:60],
            )
        )
    table(rows)
