"""Reports of experiments: the A/B comparison, run summaries, JUnit XML and Markdown.

``compare_runs`` pairs the items of two runs by item key and, per metric,
gives both means, the mean difference B − A with its bootstrap CI95, a
sign-flip permutation p-value and wins/losses/ties (from B's side), then lists
the items where B lost the most, and puts cost, tokens and latency side by side.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from keel.evals import stats
from keel.evals.runs import RunStore, metric_values, summarize

SNIPPET = 160


def _metrics_of(run: dict[str, Any]) -> list[str]:
    cfg = run.get("config") or {}
    return [e["name"] for e in cfg.get("evaluators") or [] if isinstance(e, dict)]


def _input_text(inp: Any) -> str:
    """The last user message of a stored input (what a reader recognises an item by)."""
    if isinstance(inp, list):
        for m in reversed(inp):
            if isinstance(m, dict) and m.get("role") == "user":
                c = m.get("content")
                return c if isinstance(c, str) else str(c)
    return "" if inp is None else str(inp)


def _clip(s: Any, n: int = SNIPPET) -> str:
    text = "" if s is None else " ".join(str(s).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _side(run: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    s = run.get("summary") or summarize(items, _metrics_of(run))
    return {
        "run_id": run["id"],
        "suite": run["suite"],
        "target": run["target"],
        "model": run.get("model"),
        "prompt": run.get("prompt_ref"),
        "status": run["status"],
        "dataset_version_id": run.get("dataset_version_id"),
        "items": s.get("items"),
        "errors": s.get("errors"),
        "cached": s.get("cached"),
        "cost_usd": s.get("cost_usd"),
        "cost_per_item_usd": s.get("cost_per_item_usd"),
        "tokens": s.get("tokens"),
        "latency_ms": s.get("latency_ms"),
    }


def compare_runs(
    store: RunStore, a: str, b: str, *, top: int = 5, seed: int = stats.DEFAULT_SEED
) -> dict[str, Any]:
    """The comparison of run ``b`` against run ``a`` (ids or id prefixes)."""
    run_a, run_b = store.get(a), store.get(b)
    items_a = store.items(run_a["id"])
    items_b = store.items(run_b["id"])
    by_b = {it["item_key"]: it for it in items_b}
    keys_a = {it["item_key"] for it in items_a}
    pairs = [(it, by_b[it["item_key"]]) for it in items_a if it["item_key"] in by_b]
    mb = set(_metrics_of(run_b))
    metrics = [m for m in _metrics_of(run_a) if m in mb]
    out_metrics: dict[str, Any] = {}
    drops: dict[str, float] = {}
    for m in metrics:
        va, vb = [], []
        for ia, ib in pairs:
            x, y = metric_values(ia, m), metric_values(ib, m)
            if x is None or y is None:
                continue
            va.append(x)
            vb.append(y)
            if x - y > stats.TIE_EPS:
                drops[ia["item_key"]] = drops.get(ia["item_key"], 0.0) + (x - y)
        out_metrics[m] = stats.paired_test(va, vb, seed=seed).to_dict()
    regressions = []
    by_a = {it["item_key"]: it for it in items_a}
    for key, drop in sorted(drops.items(), key=lambda kv: (-kv[1], by_a[kv[0]]["idx"]))[:top]:
        ia, ib = by_a[key], by_b[key]
        regressions.append(
            {
                "item_key": key,
                "idx": ia["idx"],
                "input": _clip(_input_text(ia["input"]), 300),
                "expected": ia.get("expected"),
                "output_a": ia.get("output") if not ia.get("error") else None,
                "output_b": ib.get("output") if not ib.get("error") else None,
                "error_a": ia.get("error"),
                "error_b": ib.get("error"),
                "scores_a": {m: metric_values(ia, m) for m in metrics},
                "scores_b": {m: metric_values(ib, m) for m in metrics},
                "drop": drop,
            }
        )
    return {
        "a": _side(run_a, items_a),
        "b": _side(run_b, items_b),
        "same_dataset": run_a.get("dataset_version_id") == run_b.get("dataset_version_id"),
        "paired_items": len(pairs),
        "only_a": len(keys_a - set(by_b)),
        "only_b": len(set(by_b) - keys_a),
        "metrics": out_metrics,
        "regressions": regressions,
    }


# -- formatting -----------------------------------------------------------------


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _usd(v: float | None) -> str:
    return "-" if v is None else f"{v:.6f}" if v < 0.01 else f"{v:.4f}"


def _p(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}" if v >= 0.0001 else f"{v:.1e}"


def _ci(lo: float | None, hi: float | None) -> str:
    return "-" if lo is None or hi is None else f"[{lo:+.3f}, {hi:+.3f}]"


def _name(side: dict[str, Any]) -> str:
    return f"{side['suite']}/{side['target']} ({side.get('model') or '-'}) run {side['run_id']}"


def _side_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    a, b = r["a"], r["b"]

    def lat(s: dict[str, Any], q: str) -> str:
        return _f((s.get("latency_ms") or {}).get(q), 1)

    def tok(s: dict[str, Any]) -> str:
        return _f((s.get("tokens") or {}).get("total"))

    return [
        ("model", a.get("model") or "-", b.get("model") or "-"),
        ("items", _f(a["items"]), _f(b["items"])),
        ("errors", _f(a["errors"]), _f(b["errors"])),
        ("cost (USD)", _usd(a["cost_usd"]), _usd(b["cost_usd"])),
        ("cost/item (USD)", _usd(a["cost_per_item_usd"]), _usd(b["cost_per_item_usd"])),
        ("tokens", tok(a), tok(b)),
        ("latency p50 (ms)", lat(a, "p50"), lat(b, "p50")),
        ("latency p95 (ms)", lat(a, "p95"), lat(b, "p95")),
    ]


def _metric_rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for m, s in r["metrics"].items():
        rows.append(
            (m, _f(s["mean_a"]), _f(s["mean_b"]),
             "-" if s["delta"] is None else f"{s['delta']:+.3f}",
             _ci(s["ci_low"], s["ci_high"]), _p(s["p_value"]),
             f"{s['wins']}/{s['losses']}/{s['ties']}", str(s["n"]))
        )  # fmt: skip
    return rows


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def compare_text(r: dict[str, Any]) -> str:
    """The comparison as a terminal report."""
    lines = [f"A: {_name(r['a'])}", f"B: {_name(r['b'])}"]
    lines.append(
        f"paired items: {r['paired_items']} (only in A: {r['only_a']}, only in B: {r['only_b']})"
        + ("" if r["same_dataset"] else "  [different dataset versions]")
    )
    lines.append("")
    head = ("METRIC", "A", "B", "DELTA (B-A)", "CI95", "P", "B W/L/T", "N")
    lines += _table([head, *_metric_rows(r)])
    lines.append("")
    lines += _table([("", "A", "B"), *_side_rows(r)])
    if r["regressions"]:
        lines += ["", "largest regressions (B scores lower than A):"]
        for g in r["regressions"]:
            sa = ", ".join(f"{m}={_f(v, 2)}" for m, v in g["scores_a"].items())
            sb = ", ".join(f"{m}={_f(v, 2)}" for m, v in g["scores_b"].items())
            lines.append(f"  #{g['idx']} {g['item_key']}: {_clip(g['input'], 100)}")
            lines.append(f"    A [{sa}]: {_clip(g['output_a'] or g['error_a'], 100)}")
            lines.append(f"    B [{sb}]: {_clip(g['output_b'] or g['error_b'], 100)}")
    return "\n".join(lines)


def _md_cell(s: Any) -> str:
    return _clip(s, SNIPPET).replace("|", "\\|")


def _md_table(rows: list[tuple[str, ...]]) -> list[str]:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows[1:]]
    return out


def compare_markdown(r: dict[str, Any]) -> str:
    """The comparison as Markdown (for a pull request comment or a CI summary)."""
    lines = [
        "## Keel eval comparison",
        "",
        f"- **A**: {_name(r['a'])}",
        f"- **B**: {_name(r['b'])}",
        f"- paired items: {r['paired_items']} (only in A: {r['only_a']}, only in B: {r['only_b']})",
        "",
    ]
    head = ("metric", "A", "B", "Δ (B−A)", "CI95", "p", "B wins/losses/ties", "n")
    lines += _md_table([head, *_metric_rows(r)])
    lines += ["", *_md_table([("", "A", "B"), *_side_rows(r)])]
    if r["regressions"]:
        lines += ["", "### Largest regressions", ""]
        rows: list[tuple[str, ...]] = [("item", "input", "A output", "B output", "drop")]
        for g in r["regressions"]:
            rows.append((f"#{g['idx']} {g['item_key']}", g["input"], g["output_a"] or
                         f"error: {g['error_a']}", g["output_b"] or f"error: {g['error_b']}",
                         f"{g['drop']:.3f}"))  # fmt: skip
        lines += _md_table(rows)
    return "\n".join(lines) + "\n"


def run_text(run: dict[str, Any]) -> str:
    """One run's summary for the terminal."""
    s = run.get("summary") or {}
    lines = [
        f"run {run['id']}  {run['suite']}/{run['target']}  model {run.get('model') or '-'}"
        + (f"  prompt {run['prompt_ref']}" if run.get("prompt_ref") else ""),
        f"  status {run['status']}  items {run['items_done']}/{run['items_total']}"
        + (f"  errors {s.get('errors', 0)}  cached {s.get('cached', 0)}" if s else ""),
    ]
    if not s:
        return "\n".join(lines)
    gates = {g["metric"]: g for g in s.get("gates") or []}
    rows: list[tuple[str, ...]] = [("METRIC", "MEAN", "CI95", "PASS", "N", "UNSCORED", "GATE")]
    for m, v in (s.get("metrics") or {}).items():
        g = gates.get(m)
        gate = "-" if g is None else ("ok" if g["passed"] else "FAIL") + f" (≥ {g['threshold']})"
        ci = "-" if v["ci_low"] is None else f"[{v['ci_low']:.3f}, {v['ci_high']:.3f}]"
        rows.append((m, _f(v["mean"]), ci, _f(v["pass_rate"]), str(v["n"]), str(v["unscored"]),
                     gate))  # fmt: skip
    lines += ["  " + x for x in _table(rows)]
    lat = s.get("latency_ms") or {}
    lines.append(
        f"  tokens {s['tokens']['total']}  cost {_usd(s.get('cost_usd'))} USD "
        f"({_usd(s.get('cost_per_item_usd'))}/item, spent {_usd(s.get('spent_usd'))})  "
        f"latency p50 {_f(lat.get('p50'), 1)} ms p95 {_f(lat.get('p95'), 1)} ms"
    )
    return "\n".join(lines)


def runs_markdown(suite: str, results: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> str:
    """Markdown summary of a suite's runs; ``results``: (run, gates) pairs."""
    ok = all(g["passed"] for _, gates in results for g in gates)
    lines = [f"## Keel eval: {suite} — {'passed' if ok else 'FAILED'}", ""]
    rows: list[tuple[str, ...]] = [("target", "metric", "mean", "CI95", "pass rate", "n",
                                    "errors", "gate")]  # fmt: skip
    for run, gates in results:
        s = run.get("summary") or {}
        by = {g["metric"]: g for g in gates}
        for m, v in (s.get("metrics") or {}).items():
            g = by.get(m)
            gate = "" if g is None else ("✅" if g["passed"] else "❌") + f" ≥ {g['threshold']}"
            ci = "-" if v["ci_low"] is None else f"{v['ci_low']:.3f}–{v['ci_high']:.3f}"
            rows.append((run["target"], m, _f(v["mean"]), ci, _f(v["pass_rate"]), str(v["n"]),
                         str(v["errors"]), gate))  # fmt: skip
    lines += _md_table(rows)
    rows = [("target", "run", "model", "items", "errors", "cached", "cost (USD)",
             "latency p50 / p95 (ms)", "tokens")]  # fmt: skip
    for run, _ in results:
        s = run.get("summary") or {}
        lat = s.get("latency_ms") or {}
        rows.append((run["target"], run["id"], run.get("model") or "-", _f(s.get("items")),
                     _f(s.get("errors")), _f(s.get("cached")), _usd(s.get("cost_usd")),
                     f"{_f(lat.get('p50'), 1)} / {_f(lat.get('p95'), 1)}",
                     _f((s.get("tokens") or {}).get("total"))))  # fmt: skip
    lines += ["", *_md_table(rows)]
    return "\n".join(lines) + "\n"


def junit_xml(suite: str, results: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> str:
    """JUnit XML: a testsuite per run, a testcase per metric gate (a failure when it fails)."""
    root = ET.Element("testsuites", name=f"keel eval {suite}")
    total = failures = 0
    for run, gates in results:
        cases = gates or [None]  # a run without gates still shows up, as one passing case
        ts = ET.SubElement(root, "testsuite", name=f"{suite}/{run['target']}",
                           tests=str(len(cases)), failures="0", errors="0")  # fmt: skip
        props = ET.SubElement(ts, "properties")
        for k in ("id", "model", "prompt_ref", "dataset_version_id"):
            if run.get(k):
                ET.SubElement(props, "property", name=k, value=str(run[k]))
        n_fail = 0
        for g in cases:
            if g is None:
                ET.SubElement(ts, "testcase", classname=f"{suite}.{run['target']}",
                              name="completed", time="0")  # fmt: skip
                continue
            tc = ET.SubElement(ts, "testcase", classname=f"{suite}.{run['target']}",
                               name=f"{g['metric']} >= {g['threshold']}", time="0")  # fmt: skip
            if not g["passed"]:
                n_fail += 1
                got = "no score" if g["value"] is None else f"{g['value']:.4f}"
                f = ET.SubElement(tc, "failure", type="threshold",
                                  message=f"{g['metric']} = {got} < {g['threshold']}")  # fmt: skip
                f.text = f"run {run['id']}: mean {g['metric']} {got}, required ≥ {g['threshold']}"
        ts.set("failures", str(n_fail))
        total += len(cases)
        failures += n_fail
    root.set("tests", str(total))
    root.set("failures", str(failures))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
