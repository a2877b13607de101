"""``keel eval online | scores | agreement | feedback``: online evaluation and feedback,
through a running Keel's REST API (``--url`` or ``KEEL_URL``; the key in ``KEEL_API_KEY``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
import httpx
import orjson

# The same option as `keel traces`; defined here so registering imports nothing of keel.cli.
url_option = click.option(
    "--url",
    envvar="KEEL_URL",
    default="http://127.0.0.1:4000",
    show_default=True,
    help="Keel's address (or KEEL_URL).",
)


def _api(url: str, path: str, params: dict[str, Any] | None = None) -> Any:
    from keel.cli import _api as get

    return get(url, path, params)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _json(obj: Any) -> None:
    click.echo(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode())


def _post(url: str, path: str, body: dict[str, Any]) -> Any:
    from keel.cli import _auth_headers, _fail

    try:
        r = httpx.post(f"{url.rstrip('/')}{path}", json=body, headers=_auth_headers(), timeout=30)
    except httpx.HTTPError as e:
        _fail(f"cannot reach Keel at {url} ({type(e).__name__}); is `keel up` running?")
    try:
        data = r.json()
    except ValueError:
        data = {}
    if r.status_code >= 400:
        msg = (data.get("error") or {}).get("message") if isinstance(data, dict) else None
        _fail(msg or f"HTTP {r.status_code}")
    return data


def register(group: click.Group) -> None:
    """Add the online evaluation commands to the ``keel eval`` group."""

    @group.command("online")
    @url_option
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def online_cmd(url: str, as_json: bool) -> None:
        """Online evaluators: queued, running, done, failed and skipped jobs; today's budget."""
        data = _api(url, "/api/evals/online")["data"]
        if as_json:
            _json(data)
            return
        if not data:
            click.echo("no online evaluators (configure evals.online in keel.yaml)")
            return
        rows = [("NAME", "KIND", "RATE", "PENDING", "RUNNING", "DONE", "FAILED", "SKIPPED",
                 "TODAY", "SPEND$", "LAST ERROR")]  # fmt: skip
        for e in data:
            j, t = e["jobs"], e["today"]
            cap = f"/{t['max_per_day']}" if t["max_per_day"] else ""
            spend = _fmt(t["spend_usd"], 4)
            if t["max_cost_usd_per_day"]:
                spend += f"/{t['max_cost_usd_per_day']:g}"
            err = (e["last_error"] or {}).get("error") or "-"
            rows.append(
                (
                    e["name"],
                    e["evaluator"],
                    f"{e['sample_rate']:g}",
                    *(str(j[s]) for s in ("pending", "running", "done", "failed", "skipped")),
                    f"{t['evaluations']}{cap}",
                    spend,
                    err[:60],
                )
            )
        _table(rows)

    @group.command("scores")
    @click.argument("trace_id")
    @url_option
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def scores_cmd(trace_id: str, url: str, as_json: bool) -> None:
        """Scores of one trace: online evaluators, judges, human feedback."""
        data = _api(url, f"/api/traces/{trace_id}/scores")["data"]
        if as_json:
            _json(data)
            return
        if not data:
            click.echo(f"trace {trace_id} has no scores yet")
            return
        rows = [("NAME", "SOURCE", "VALUE", "LABEL", "PASSED", "WHEN (UTC)", "BY / COMMENT")]
        for s in data:
            when = datetime.fromtimestamp(s["created_at_ms"] / 1000, UTC).strftime("%m-%d %H:%M:%S")
            note = s["comment"] or s["created_by"] or (s["details"] or {}).get("reasoning") or ""
            rows.append(
                (
                    s["name"],
                    s["source"],
                    _fmt(s["value"]),
                    s["label"] or "-",
                    _fmt(s["passed"]),
                    when,
                    note[:60] or "-",
                )
            )
        _table(rows)

    @group.command("agreement")
    @click.option("--evaluator", required=True, help="Score name of the evaluator or judge.")
    @click.option("--human", required=True, help="Score name of the human feedback.")
    @click.option("--since", default=None, help="An age (7d), ISO 8601 or epoch ms.")
    @url_option
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def agreement_cmd(
        evaluator: str, human: str, since: str | None, url: str, as_json: bool
    ) -> None:
        """How well an evaluator agrees with people on the same traces."""
        a = _api(url, "/api/evals/agreement", {"evaluator": evaluator, "human": human,
                                                "since": since})  # fmt: skip
        if as_json:
            _json(a)
            return
        click.echo(f"{evaluator} vs {human}: {a['n']} trace(s) scored by both")
        if a["numeric"]:
            n = a["numeric"]
            click.echo(
                f"  numeric ({n['n']}): pearson {_fmt(n['pearson'])}  spearman "
                f"{_fmt(n['spearman'])}  mean |diff| {_fmt(n['mean_abs_diff'])}"
            )
        if a["categorical"]:
            c = a["categorical"]
            click.echo(
                f"  {c['basis']} ({c['n']}): agreement {_fmt(c['agreement'])}  "
                f"Cohen's kappa {_fmt(c['kappa'])}"
            )
        for d in a["disagreements"]:
            ev, hu = d["evaluator"], d["human"]
            click.echo(
                f"  {d['trace_id']}  {evaluator}={_fmt(ev['value'])}/{ev['label'] or '-'}  "
                f"{human}={_fmt(hu['value'])}/{hu['label'] or '-'}"
            )

    @group.command("feedback")
    @click.argument("trace_id")
    @click.option("--score", type=float, default=None, help="A number (1/0 for thumbs).")
    @click.option("--label", default=None, help="A category.")
    @click.option("--comment", default=None)
    @click.option("--name", default="user", show_default=True, help="What is rated.")
    @click.option("--source", type=click.Choice(["human", "api"]), default="human")
    @url_option
    def feedback_cmd(
        trace_id: str,
        score: float | None,
        label: str | None,
        comment: str | None,
        name: str,
        source: str,
        url: str,
    ) -> None:
        """Rate a trace (as a reviewer)."""
        from keel.cli import _fail

        if score is None and label is None:
            _fail("give --score and/or --label")
        body: dict[str, Any] = {"name": name, "source": source}
        for k, v in (("score", score), ("label", label), ("comment", comment)):
            if v is not None:
                body[k] = v
        s = _post(url, f"/api/traces/{trace_id}/feedback", body)
        click.echo(f"recorded {s['name']} on {trace_id}: {_fmt(s['value'])} {s['label'] or ''}")
