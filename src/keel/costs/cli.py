"""``keel costs``: spend by group, cost against input length, model comparison.

Registered by ``keel.cli`` with ``cli.add_command(costs)``; calls the REST API.
"""

from __future__ import annotations

from typing import Any

import click
import orjson

DEFAULT_URL = "http://127.0.0.1:4000"

url_option = click.option(
    "--url",
    envvar="KEEL_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="Keel's address (or KEEL_URL).",
)


def _api(url: str, path: str, params: dict[str, Any]) -> Any:
    from keel.cli import _api as call  # late: keel.cli imports this module

    return call(url, path, params)


def _usd(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "$0"
    sign = "-" if v < 0 else ""
    if abs(v) < 1:
        return f"{sign}${abs(v):.4g}"
    return f"{sign}${abs(v):,.2f}"


def _num(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _json(data: Any) -> None:
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


@click.group(invoke_without_command=True)
@url_option
@click.option(
    "--group-by",
    default="model",
    show_default=True,
    type=click.Choice(["model", "provider", "key", "user", "feature", "day"]),
)
@click.option("--since", default="30d", show_default=True, help="ISO 8601 or an age: 24h, 7d.")
@click.option("--until", default=None, help="ISO 8601 or an age [default: now].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def costs(
    ctx: click.Context, url: str, group_by: str, since: str, until: str | None, as_json: bool
) -> None:
    """Spend by model, provider, key, user, feature or day, and the projected month."""
    if ctx.invoked_subcommand is not None:
        return
    r = _api(url, "/api/costs", {"group_by": group_by, "from": since, "to": until})
    if as_json:
        _json(r)
        return
    click.echo(f"spend {r['from'][:16]} → {r['to'][:16]} UTC, by {group_by}")
    fmt = "{:<28} {:>9} {:>12} {:>10} {:>7} {:>9} {:>14}"
    click.echo(
        fmt.format(group_by.upper(), "REQS", "COST", "PER 1K", "SHARE", "UNPRICED", "MONTH (PROJ.)")
    )
    for d in r["data"]:
        click.echo(
            fmt.format(
                str(d["group"])[:28],
                d["requests"],
                _usd(d["cost_usd"]),
                _usd(d["cost_per_1k_requests"]),
                "-" if d["share"] is None else f"{d['share'] * 100:.1f}%",
                d["unknown_cost_requests"],
                _usd(d["projected_monthly_usd"]),
            )
        )
    t, p = r["total"], r["projection"]
    click.echo(
        fmt.format(
            "TOTAL",
            t["requests"],
            _usd(t["cost_usd"]),
            _usd(t["cost_per_1k_requests"]),
            "",
            t["unknown_cost_requests"],
            _usd(p["projected_monthly_usd"]),
        )
    )
    click.echo(
        f"projected monthly spend: {_usd(p['projected_monthly_usd'])} "
        f"({p['method']}: {_usd(p['base_cost_usd'])})"
    )
    if p.get("note"):
        click.echo(f"note: {p['note']}")
    if t["unknown_cost_requests"]:
        click.echo(
            f"warning: {t['unknown_cost_requests']} call(s) have no known price and count as $0; "
            "add their models under `prices:` in keel.yaml"
        )


@costs.command("compare")
@url_option
@click.option("--models", required=True, help="Comma-separated model aliases: a,b.")
@click.option("--since", default="7d", show_default=True, help="ISO 8601 or an age: 24h, 7d.")
@click.option("--until", default=None, help="ISO 8601 or an age [default: now].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def costs_compare(url: str, models: str, since: str, until: str | None, as_json: bool) -> None:
    """Models side by side over the same period: errors, p95 latency, tokens, cost."""
    r = _api(url, "/api/costs/compare", {"models": models, "since": since, "until": until})
    if as_json:
        _json(r)
        return
    click.echo(f"{r['from'][:16]} → {r['to'][:16]} UTC")
    fmt = "{:<24} {:>8} {:>6} {:>8} {:>9} {:>9} {:>12} {:>10}"
    click.echo(
        fmt.format("MODEL", "REQS", "ERR%", "P95ms", "PROMPT", "COMPL.", "COST/REQ", "PER 1K")
    )
    for d in r["data"]:
        click.echo(
            fmt.format(
                d["model"][:24],
                d["requests"],
                _num(None if d["error_rate"] is None else d["error_rate"] * 100, "{:.1f}"),
                _num(d["latency_p95_ms"]),
                _num(d["mean_prompt_tokens"], "{:.1f}"),
                _num(d["mean_completion_tokens"], "{:.1f}"),
                _usd(d["cost_per_request"]),
                _usd(d["cost_per_1k_requests"]),
            )
        )
    click.echo(f"note: {r['note']}")


@costs.command("by-length")
@url_option
@click.option("--model", default=None, help="A model alias (recommended: one model's prices).")
@click.option("--since", default="7d", show_default=True, help="ISO 8601 or an age: 24h, 7d.")
@click.option("--buckets", type=int, default=10, show_default=True)
@click.option("--scale", type=click.Choice(["log", "quantile"]), default="log", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def costs_by_length(
    url: str, model: str | None, since: str, buckets: int, scale: str, as_json: bool
) -> None:
    """What long prompts cost: buckets of prompt length and a linear fit."""
    r = _api(
        url,
        "/api/costs/by-input-length",
        {"model": model, "since": since, "buckets": buckets, "scale": scale},
    )
    if as_json:
        _json(r)
        return
    click.echo(f"{r['points']} priced call(s){' (most recent)' if r['truncated'] else ''}")
    fmt = "{:>17} {:>8} {:>12} {:>12} {:>12} {:>7}"
    click.echo(fmt.format("PROMPT TOKENS", "CALLS", "MEAN TOKENS", "MEAN COST", "MEAN ms", "SHARE"))
    for b in r["buckets"]:
        click.echo(
            fmt.format(
                f"{b['min_prompt_tokens']}-{b['max_prompt_tokens']}",
                b["count"],
                f"{b['mean_prompt_tokens']:.0f}",
                _usd(b["mean_cost_usd"]),
                f"{b['mean_latency_ms']:.0f}",
                "-" if b["share_of_cost"] is None else f"{b['share_of_cost'] * 100:.1f}%",
            )
        )
    f = r["cost_fit"]
    if f is not None:
        click.echo(
            f"fit: cost ≈ {_usd(f['intercept_usd'])} + {_usd(f['usd_per_1k_prompt_tokens'])} "
            f"per 1k prompt tokens (r² {f['r2']:.3f}, {f['n']} calls)"
        )
    lf = r["latency_fit"]
    if lf is not None:
        click.echo(
            f"latency ≈ {lf['intercept_ms']:.0f} ms + {lf['ms_per_1k_prompt_tokens']:.1f} ms "
            f"per 1k prompt tokens (r² {lf['r2']:.3f})"
        )
    if r.get("note"):
        click.echo(f"note: {r['note']}")
