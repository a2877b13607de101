"""The ``keel`` command. Thin: parses flags, loads settings, calls the packages."""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from typing import Any

import click
import httpx
import orjson

from keel._version import __version__
from keel.config import Settings, load_settings, reference_rows
from keel.errors import KeelError

DEFAULT_URL = "http://127.0.0.1:4000"


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(1)


def _settings(config: str | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, overrides=overrides)
    except KeelError as e:
        _fail(str(e))
        raise AssertionError from None  # unreachable


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Keel: an OpenAI-compatible gateway that records every call, and the ops loop around it."""


@cli.command()
def version() -> None:
    """Print Keel's version."""
    click.echo(f"keel {__version__}")


_ROLE_SETS = {"all": ("gateway", "daemons"), "gateway": ("gateway",), "worker": ("daemons",)}


def _serve(
    host: str | None, port: int | None, data_dir: str | None, config: str | None, role: str
) -> None:
    import uvicorn

    from keel.app import create_app

    s = _settings(config, host=host, port=port, data_dir=data_dir)
    logging.basicConfig(
        level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if s.log_level != "debug":  # migrations are logged at INFO, line by line
        logging.getLogger("alembic").setLevel(logging.WARNING)
    # The recorder's writer thread holds the GIL while it prepares a batch; with
    # the default 5 ms switch interval the event loop could wait that long for
    # it. 0.5 ms keeps the gateway's tail latency low (bench/gateway_overhead.py).
    sys.setswitchinterval(0.0005)
    app = create_app(s, environ=dict(os.environ), roles=_ROLE_SETS[role])
    what = {"all": "", "gateway": " [role: gateway]", "worker": " [role: worker]"}[role]
    click.echo(
        f"keel {__version__}{what} on http://{s.host}:{s.port}  (store: "
        f"{_redact(s.effective_database_url)}, models: "
        f"{', '.join(app.state.keel.router.names()) or 'none'})"
    )
    if role != "worker":
        click.echo(
            f"  OpenAI base URL: http://{s.host}:{s.port}/v1   "
            f"API docs: http://{s.host}:{s.port}/docs"
        )
    else:
        click.echo(
            "  runs alerts, probes and retention (one replica leads each); "
            "serves the API and /metrics"
        )
    uvicorn.run(
        app,
        host=s.host,
        port=s.port,
        log_level=s.log_level,
        access_log=False,
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=10,
    )


_server_options = [
    click.option("--host", default=None, help="Address to listen on [default: 127.0.0.1]."),
    click.option("--data-dir", default=None, help="Data directory [default: ./.keel]."),
    click.option(
        "--config", "config", default=None, help="keel.yaml [default: ./keel.yaml if present]."
    ),
]


def _with_server_options(f: Any) -> Any:
    for opt in reversed(_server_options):
        f = opt(f)
    return f


@cli.command()
@_with_server_options
@click.option("--port", type=int, default=None, help="Port [default: 4000].")
@click.option(
    "--role",
    type=click.Choice(list(_ROLE_SETS)),
    default="all",
    show_default=True,
    help="all: everything in one process; gateway: serve calls, no background jobs "
    "(run `keel worker` somewhere).",
)
def up(
    host: str | None, port: int | None, data_dir: str | None, config: str | None, role: str
) -> None:
    """Start Keel: gateway, API and recorder, on SQLite and the local model by default."""
    _serve(host, port, data_dir, config, role)


@cli.command()
@_with_server_options
@click.option("--port", type=int, default=4001, show_default=True, help="Port.")
def worker(host: str | None, port: int, data_dir: str | None, config: str | None) -> None:
    """Run the background jobs (alerts, probes, retention) without the gateway."""
    _serve(host, port, data_dir, config, "worker")


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


@cli.group()
def config() -> None:
    """Validate and document the configuration."""


@config.command("check")
@click.option("--config", "path", default=None, help="File to check [default: ./keel.yaml].")
def config_check(path: str | None) -> None:
    """Validate the whole configuration; exit 1 listing every bad entry."""
    s = _settings(path)
    from keel.alerts.api import validate_alert_config
    from keel.drift import signals as _drift_signals  # noqa: F401  (rules may use them)

    try:
        validate_alert_config(s.alerts, path or "keel.yaml")
    except KeelError as e:
        _fail(str(e))
    from keel.evals.online import validate_online

    try:
        validate_online(s.evals, path or "keel.yaml")
    except KeelError as e:
        _fail(str(e))
    warnings = []
    for name, p in s.providers.items():
        if p.api_key_env and not os.environ.get(p.api_key_env):
            warnings.append(f"providers.{name}.api_key_env: ${p.api_key_env} is not set")
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    models = ["local", "local-embed"] if s.local.enabled else []
    models += list(s.models)
    click.echo(
        f"configuration OK: {len(s.providers)} provider(s), models: "
        f"{', '.join(models) or 'none'}; store: {_redact(s.effective_database_url)}"
    )


@config.command("reference")
def config_reference() -> None:
    """Print every setting (keel.yaml path, KEEL_* variable, type, default) as Markdown."""
    click.echo("| keel.yaml | environment | type | default | meaning |")
    click.echo("|---|---|---|---|---|")
    for path, env, typ, default, doc in reference_rows():
        click.echo(f"| `{path}` | `{env}` | {typ} | `{default}` | {doc} |")


@cli.group()
def db() -> None:
    """Manage the store."""


@db.command("upgrade")
@click.option("--config", "path", default=None)
def db_upgrade(path: str | None) -> None:
    """Apply schema migrations (keel up does this too)."""
    from keel.store.engine import current_revision, make_engine, migrate

    s = _settings(path)
    engine = make_engine(s.effective_database_url)
    try:
        migrate(engine)
    except KeelError as e:
        _fail(str(e))
    click.echo(f"store at revision {current_revision(engine)}")


# -- traces ------------------------------------------------------------------


def _auth_headers() -> dict[str, str]:
    """The key the CLI sends when Keel requires one ($KEEL_API_KEY, e.g. a read key)."""
    key = os.environ.get("KEEL_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _api(url: str, path: str, params: dict[str, Any] | None = None) -> Any:
    try:
        r = httpx.get(
            f"{url.rstrip('/')}{path}",
            params={k: v for k, v in (params or {}).items() if v is not None},
            timeout=30,
            headers=_auth_headers(),
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


url_option = click.option(
    "--url",
    envvar="KEEL_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="Keel's address (or KEEL_URL).",
)


@cli.group()
def traces() -> None:
    """Look at recorded calls."""


@traces.command("list")
@url_option
@click.option("--model")
@click.option("--status", type=click.Choice(["ok", "error", "cancelled"]))
@click.option("--user")
@click.option("--feature")
@click.option("--since", help="ISO 8601 or an age: 15m, 24h, 7d.")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def traces_list(
    url: str,
    model: str | None,
    status: str | None,
    user: str | None,
    feature: str | None,
    since: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List recent traces, newest first."""
    page = _api(
        url,
        "/api/traces",
        {
            "model": model,
            "status": status,
            "user": user,
            "feature": feature,
            "since": since,
            "limit": limit,
        },
    )
    if as_json:
        click.echo(orjson.dumps(page, option=orjson.OPT_INDENT_2).decode())
        return
    rows = page["data"]
    if not rows:
        click.echo("no traces yet: send a request to /v1/chat/completions")
        return
    fmt = "{:<32}  {:<19}  {:<16}  {:<9}  {:>9}  {:>6}  {:<12}"
    click.echo(fmt.format("ID", "STARTED (UTC)", "MODEL", "STATUS", "LATENCY", "TOKENS", "USER"))
    for t in rows:
        started = datetime.fromisoformat(t["started_at"]).strftime("%Y-%m-%d %H:%M:%S")
        tokens = t["total_tokens"] if t["total_tokens"] is not None else "-"
        if t["tokens_estimated"] and tokens != "-":
            tokens = f"~{tokens}"
        click.echo(
            fmt.format(
                t["id"],
                started,
                t["model"][:16],
                t["status"],
                f"{t['duration_ms']:.0f} ms",
                str(tokens),
                (t["user"] or "-")[:12],
            )
        )


@traces.command("show")
@click.argument("trace_id")
@url_option
def traces_show(trace_id: str, url: str) -> None:
    """Print one trace with its request and response (JSON)."""
    t = _api(url, f"/api/traces/{trace_id}")
    click.echo(orjson.dumps(t, option=orjson.OPT_INDENT_2).decode())


@cli.command()
@url_option
@click.option("--window", default="1h", show_default=True, help="5m, 15m, 1h, 6h, 24h, 7d or 30d.")
@click.option(
    "--group-by",
    default="model",
    show_default=True,
    type=click.Choice(["model", "provider", "endpoint", "feature", "user", "none"]),
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(url: str, window: str, group_by: str, as_json: bool) -> None:
    """Traffic, errors, latency and TTFT percentiles and tokens, from the rollups."""
    s = _api(url, "/api/metrics/summary", {"window": window, "group_by": group_by})
    if as_json:
        click.echo(orjson.dumps(s, option=orjson.OPT_INDENT_2).decode())
        return

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    fmt = "{:<20} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9} {:>10}"
    click.echo(f"last {window}, by {group_by}")
    click.echo(
        fmt.format(
            group_by.upper(), "REQS", "ERR%", "RPS", "P50ms", "P95ms", "P99ms", "TTFT p50", "TOKENS"
        )
    )
    for d in [*s["data"], {**s["total"], "group": "TOTAL"}]:
        click.echo(
            fmt.format(
                str(d["group"])[:20],
                d["requests"],
                f"{d['error_rate'] * 100:.1f}",
                f"{d['rps']:.2f}",
                ms(d["latency_p50_ms"]),
                ms(d["latency_p95_ms"]),
                ms(d["latency_p99_ms"]),
                ms(d["ttft_p50_ms"]),
                d["total_tokens"],
            )
        )


@cli.group()
def alerts() -> None:
    """Alerts: what is firing, rules, silences, test messages."""


def _ago(ms: int | None) -> str:
    if not ms:
        return "-"
    import time as _t

    secs = max(0, int(_t.time() - ms / 1000))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= n:
            return f"{secs // n}{unit} ago"
    return f"{secs}s ago"


@alerts.command("list")
@url_option
@click.option(
    "--state",
    default="active",
    show_default=True,
    type=click.Choice(["active", "firing", "pending", "resolved", "all"]),
)
@click.option("--json", "as_json", is_flag=True)
def alerts_list(url: str, state: str, as_json: bool) -> None:
    """Firing and pending alerts (or --state all)."""
    data = _api(url, "/api/alerts", {"state": state})["data"]
    if as_json:
        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return
    if not data:
        click.echo(f"no {state} alerts")
        return
    fmt = "{:<9} {:<9} {:<28} {:<28} {:>12} {:>12}  {}"
    click.echo(fmt.format("STATE", "SEVERITY", "RULE", "LABELS", "VALUE", "SINCE", ""))
    for a in data:
        since = a["firing_since_ms"] or a["pending_since_ms"] or a["resolved_at_ms"]
        labels = ",".join(f"{k}={v}" for k, v in a["labels"].items()) or "-"
        value = "-" if a["value"] is None else f"{a['value']:.4g}"
        click.echo(
            fmt.format(
                a["state"],
                a["severity"] or "-",
                a["rule"][:28],
                labels[:28],
                value,
                _ago(since),
                "(silenced)" if a["silenced"] else "",
            )
        )


@alerts.command("rules")
@url_option
def alerts_rules(url: str) -> None:
    """The rules Keel evaluates (from keel.yaml and the API)."""
    for r in _api(url, "/api/alerts/rules")["data"]:
        spec = r["spec"]
        c = spec["condition"]
        click.echo(
            f"{r['name']:<28} [{r['source']}] {spec['signal']} {c['mode']} {c['op']} "
            f"{c['threshold']} over {spec['window']:.0f}s for {spec['for']:.0f}s "
            f"→ {', '.join(spec['channels']) or '(no channel)'}"
        )


@alerts.command("silence")
@click.argument("rule", required=False)
@url_option
@click.option("--for", "duration", default="1h", show_default=True, help="30m, 2h, 1d…")
@click.option("--label", "labels", multiple=True, help="k=v; repeatable.")
@click.option("--comment", default=None)
def alerts_silence(
    rule: str | None, url: str, duration: str, labels: tuple[str, ...], comment: str | None
) -> None:
    """Mute RULE (or any rule matching --label) for a while."""
    matchers = {}
    for lbl in labels:
        k, sep, v = lbl.partition("=")
        if not sep:
            _fail(f"--label must be k=v, got {lbl!r}")
        matchers[k] = v
    body = {
        "rule": rule,
        "matchers": matchers,
        "duration": duration,
        "comment": comment,
        "created_by": os.environ.get("USER"),
    }
    try:
        r = httpx.post(
            f"{url.rstrip('/')}/api/alerts/silences",
            json=body,
            timeout=30,
            headers=_auth_headers(),
        )
    except httpx.HTTPError as e:
        _fail(f"cannot reach Keel at {url} ({type(e).__name__}); is `keel up` running?")
    if r.status_code >= 400:
        _fail(r.json().get("error", {}).get("message", f"HTTP {r.status_code}"))
    s = r.json()
    click.echo(
        f"silence {s['id']} until "
        f"{datetime.fromtimestamp(s['ends_at_ms'] / 1000).isoformat(timespec='minutes')}"
    )


@alerts.command("test")
@click.argument("channel")
@url_option
def alerts_test(channel: str, url: str) -> None:
    """Send a test message to CHANNEL and say whether it arrived."""
    try:
        r = httpx.post(
            f"{url.rstrip('/')}/api/alerts/test",
            json={"channel": channel},
            timeout=120,
            headers=_auth_headers(),
        )
    except httpx.HTTPError as e:
        _fail(f"cannot reach Keel at {url} ({type(e).__name__}); is `keel up` running?")
    body = r.json()
    if r.status_code >= 400:
        _fail(body.get("error", {}).get("message", f"HTTP {r.status_code}"))
    if body.get("status") != "sent":
        _fail(
            f"test message to {channel} failed after {body.get('attempts')} attempt(s): "
            f"{body.get('error')}"
        )
    click.echo(f"test message sent to {channel} ({body.get('attempts')} attempt(s))")


@alerts.command("signals")
@url_option
def alerts_signals(url: str) -> None:
    """Signals that rules can watch."""
    for s in _api(url, "/api/alerts/signals")["data"]:
        click.echo(f"{s['name']:<26} {s['unit']:<8} [{', '.join(s['labels'])}] {s['description']}")


def _register_groups() -> None:
    from keel.auth.cli import keys
    from keel.costs.cli import costs
    from keel.data.cli import data
    from keel.deploy.cli import deploy
    from keel.drift.cli import drift
    from keel.evals.cli import eval_group
    from keel.pipelines.cli import ci, pipeline
    from keel.prompts.cli import prompts
    from keel.registry.cli import registry
    from keel.runs.cli import runs

    cli.add_command(keys)
    cli.add_command(costs)
    cli.add_command(prompts)
    cli.add_command(data)
    cli.add_command(deploy)
    cli.add_command(runs)
    cli.add_command(registry)
    cli.add_command(eval_group, name="eval")
    cli.add_command(drift)
    cli.add_command(pipeline)
    cli.add_command(ci)


_register_groups()


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeelError as e:
        _fail(str(e))


if __name__ == "__main__":  # pragma: no cover
    main()
