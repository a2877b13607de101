"""What a person reads: per-feature summaries, topic examples, the terminal report."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np

from keel.drift.tests import GROWN_DELTA, TestResult, category_counts

#: Examples shown per grown topic, and for the inputs far from every topic.
EXAMPLES = 3


def numeric_summary(x: np.ndarray) -> dict[str, Any]:
    if not len(x):
        return {"n": 0}
    q = np.quantile(x, [0.1, 0.5, 0.9, 0.99])
    return {
        "n": len(x),
        "mean": float(x.mean()),
        "p10": float(q[0]),
        "p50": float(q[1]),
        "p90": float(q[2]),
        "p99": float(q[3]),
    }


def categorical_summary(ref: list[Any], cur: list[Any], top: int = 6) -> dict[str, Any]:
    labels, r, c = category_counts(ref, cur)
    rs, cs = r / max(r.sum(), 1), c / max(c.sum(), 1)
    order = np.argsort(-np.abs(cs - rs), kind="stable")[:top]
    return {
        "n_ref": int(r.sum()),
        "n_cur": int(c.sum()),
        "moved": [
            {
                "value": labels[i],
                "ref_share": float(rs[i]),
                "cur_share": float(cs[i]),
                "delta": float(cs[i] - rs[i]),
            }
            for i in order
        ],
    }


def _nearest_texts(
    texts: list[str | None], members: np.ndarray, dist: np.ndarray, k: int
) -> list[str]:
    """Texts of the ``members`` (indices) closest to their centre: the most typical."""
    out: list[str] = []
    for i in members[np.argsort(dist[members], kind="stable")]:
        t = texts[i]
        if t and t not in out:
            out.append(t)
        if len(out) >= k:
            break
    return out


def topic_examples(
    topic: TestResult, ref_texts: list[str | None], cur_texts: list[str | None], cur: np.ndarray
) -> dict[str, Any]:
    """The topic test's clusters with examples: what each topic is (reference inputs
    nearest its centre) and, for grown ones, current inputs; plus current inputs far
    from every topic (those nearest the middle of that far group: a new topic)."""
    a = topic.arrays
    clusters = []
    for c in topic.details["clusters"]:
        i = c["cluster"]
        ref_members = np.flatnonzero(a["ref_assign"] == i)
        ref_rows = a["ref_index"][ref_members]
        about = _nearest_texts(
            [ref_texts[j] for j in ref_rows],
            np.arange(len(ref_rows)),
            a["ref_dist"][ref_members],
            2,
        )
        entry = {**c, "about": about}
        if c["delta"] >= GROWN_DELTA:
            members = np.flatnonzero((a["cur_assign"] == i) & ~a["cur_far"])
            entry["examples"] = _nearest_texts(cur_texts, members, a["cur_dist"], EXAMPLES)
        clusters.append(entry)
    clusters.sort(key=lambda c: -c["delta"])
    far_idx = np.flatnonzero(a["cur_far"])
    far_examples: list[str] = []
    if len(far_idx):
        centre = cur[far_idx].mean(0)
        d = np.linalg.norm(cur[far_idx] - centre, axis=1)
        dist = np.zeros(len(cur_texts))
        dist[far_idx] = d
        far_examples = _nearest_texts(cur_texts, far_idx, dist, EXAMPLES)
    return {"clusters": clusters, "far": {**topic.details["far"], "examples": far_examples}}


# -- the terminal report -------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _time(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _reference(ref: dict[str, Any]) -> str:
    if ref.get("kind") == "dataset":
        return f"dataset {ref.get('dataset')}@{str(ref.get('version', ''))[:12]}"
    return f"{ref.get('kind')} {_time(ref.get('start_ms'))} → {_time(ref.get('end_ms'))}"


def _clip(text: str, n: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _feature_line(f: dict[str, Any]) -> str:
    t = f["tests"]
    mark = "DRIFTED" if f["drifted"] else "ok     "
    if f["kind"] == "numeric":
        r, c = f["summary"]["ref"], f["summary"]["cur"]
        return (
            f"  {mark} {f['feature']:<20} PSI {_num(t['psi']['statistic'])}, "
            f"KS p={_num(t['ks']['p_value'])}; median {_num(r.get('p50'))} → "
            f"{_num(c.get('p50'))}, mean {_num(r.get('mean'))} → {_num(c.get('mean'))}"
        )
    if f["kind"] == "categorical":
        moved = f["summary"]["moved"][:3]
        shares = ", ".join(
            f"{m['value']} {_pct(m['ref_share'])} → {_pct(m['cur_share'])}" for m in moved
        )
        return (
            f"  {mark} {f['feature']:<20} JS {_num(t['js']['statistic'])}, "
            f"chi² p={_num(t['chi2']['p_value'])}; {shares}"
        )
    topic = t["topic"]
    return (
        f"  {mark} {f['feature']:<20} MMD p={_num(t['mmd']['p_value'])}; topics: JS "
        f"{_num(topic['statistic'])}, p={_num(topic['details'].get('p_share'))}"
    )


def render_text(run: dict[str, Any]) -> str:
    """A drift run as a readable terminal report: which features moved, by how much,
    sorted by severity, and examples of the new or grown topics."""
    rep = run.get("report") or {}
    lines = [
        f"drift run {run['id']} of monitor {run['monitor']} at {_time(run['computed_at_ms'])}",
        f"  current: {_time(run['window_start_ms'])} → {_time(run['window_end_ms'])} "
        f"({run['n_current']} traces); reference: {_reference(run.get('reference') or {})} "
        f"({run['n_reference']})",
    ]
    status = rep.get("status", "ok")
    if status != "ok":
        lines.append(f"  {status.replace('_', ' ')}: {rep.get('message', '')}")
        return "\n".join(lines)
    drifted = rep.get("drifted_features", [])
    verdict = f"DRIFTED: {', '.join(drifted)}" if drifted else "no drift"
    lines.append(
        f"  {verdict}  ({rep.get('tests')} tests, each at alpha "
        f"{_num(rep.get('alpha_per_test'))} = {_num(rep.get('alpha'))}/{rep.get('tests')})"
    )
    lines.append("")
    for f in rep.get("features", []):
        lines.append(_feature_line(f))
        topics = f.get("topics")
        if not topics or not f["drifted"]:
            continue
        topic = f["tests"]["topic"]["details"]
        far = topics["far"]
        grown = [c for c in topics["clusters"] if c.get("examples")]
        hint = ""
        if not topic.get("shares_moved"):
            # Shares did not move significantly: with MMD alone to go by, the largest
            # rise is a hint; next to a new topic it is noise.
            grown, hint = ([] if far.get("moved") else grown[:1]), "largest change: "
        for c in grown:
            about = f" (like: {_clip(c['about'][0], 60)!r})" if c.get("about") else ""
            lines.append(
                f"      {hint}topic {c['cluster']}{about} grew from {_pct(c['ref_share'])} to "
                f"{_pct(c['cur_share'])} of traffic; examples:"
            )
            lines.extend(f"        - {_clip(e)}" for e in c["examples"])
        if far.get("moved") and far.get("examples"):
            lines.append(
                f"      {_pct(far['cur_share'])} of current inputs are far from every "
                f"reference topic (ref: {_pct(far['ref_share'])}); examples:"
            )
            lines.extend(f"        - {_clip(e)}" for e in far["examples"])
    for s in rep.get("skipped", []):
        lines.append(f"  skipped {s['feature']}: {s['reason']}")
    for note in rep.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)
