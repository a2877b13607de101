"""Scores on traces: write one (with its per-minute rollup), read them back, compare raters.

A score comes from an online evaluator (``source="online"``), from a person
(``human``; the REST API or the SDK) or from automatic labelling. Writing a
score and adding it to ``score_rollups_minute`` happen in one transaction, and
the rollup is only incremented when the score row was really inserted: a
score with a ``dedup_key`` (``online:<trace>:<name>``) that is already stored
is ignored, so running the same job twice (after a crash, or two workers
racing) can neither double a score nor double-count it in the rollups.

Rollup columns: ``count`` and ``value_sum`` cover the scores *with a value*
(their mean is ``value_sum / count``); ``passed`` / ``failed`` count the scores
with a pass/fail outcome. A label-only score (no value, no outcome) has no
rollup; it is still listed with its trace.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import and_, bindparam, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from keel._ids import new_id
from keel.daemon import now_ms
from keel.errors import InvalidRequest
from keel.store.tables_quality import score_rollups_minute, scores

MINUTE = 60_000
MAX_POINTS = 10_000  # most buckets one time series answers with
MAX_PAIRS = 200_000  # most scores of one name read for an agreement report


@dataclass
class NewScore:
    """A score to write. ``details`` is free JSON (reasoning, judge model, prompt, cost)."""

    trace_id: str
    name: str
    source: str
    value: float | None = None
    label: str | None = None
    passed: bool | None = None
    comment: str | None = None
    evaluator: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    created_by: str | None = None
    dedup_key: str | None = None
    created_at_ms: int | None = None


_SCORE_COLS = (
    "id", "trace_id", "name", "value", "label", "comment", "source", "evaluator", "details",
    "model", "created_at_ms", "created_by", "dedup_key",
)  # fmt: skip
_ROLLUP_COLS = ("minute_ms", "name", "model", "source", "count", "value_sum", "passed", "failed")
_STATEMENTS: dict[str, tuple[Any, Any]] = {}


def _statements(dialect: str) -> tuple[Any, Any]:
    """(insert-ignore score RETURNING id, additive rollup upsert), built once per dialect:
    building them per score cost more than running them."""
    cached = _STATEMENTS.get(dialect)
    if cached is None:
        ins = postgresql.insert if dialect == "postgresql" else sqlite.insert
        score = (
            ins(scores)
            .values({c: bindparam(c) for c in _SCORE_COLS})
            .on_conflict_do_nothing(index_elements=["dedup_key"])
            .returning(scores.c.id)
        )
        r = score_rollups_minute
        up = ins(r).values({c: bindparam(c) for c in _ROLLUP_COLS})
        ex = up.excluded
        rollup = up.on_conflict_do_update(
            index_elements=["minute_ms", "name", "model", "source"],
            set_={c: r.c[c] + ex[c] for c in ("count", "value_sum", "passed", "failed")},
        )
        cached = _STATEMENTS[dialect] = (score, rollup)
    return cached


def write_score(conn: Connection, s: NewScore) -> str | None:
    """Insert ``s`` and add it to the rollups, in the caller's transaction.

    Returns the new score's id, or None when a score with the same ``dedup_key``
    is already stored (then nothing is written and the rollups are untouched).
    """
    t = s.created_at_ms if s.created_at_ms is not None else now_ms()
    details = dict(s.details)
    if s.passed is not None:
        details["passed"] = bool(s.passed)
    sid = new_id()
    score_stmt, rollup_stmt = _statements(conn.dialect.name)
    params = {
        "id": sid,
        "trace_id": s.trace_id,
        "name": s.name,
        "value": s.value,
        "label": s.label,
        "comment": s.comment,
        "source": s.source,
        "evaluator": s.evaluator,
        "details": orjson.dumps(details, default=str).decode() if details else None,
        "model": s.model,
        "created_at_ms": t,
        "created_by": s.created_by,
        "dedup_key": s.dedup_key,
    }
    # RETURNING, not rowcount: drivers disagree on the rowcount of an ignored insert.
    # (A NULL dedup_key never conflicts: feedback may be given many times.)
    if conn.execute(score_stmt, params).first() is None:
        return None
    has_value = s.value is not None
    if has_value or s.passed is not None:
        conn.execute(
            rollup_stmt,
            {
                "minute_ms": t // MINUTE * MINUTE,
                "name": s.name,
                "model": s.model or "",
                "source": s.source,
                "count": 1 if has_value else 0,
                "value_sum": float(s.value) if has_value else 0.0,  # type: ignore[arg-type]
                "passed": 1 if s.passed is True else 0,
                "failed": 1 if s.passed is False else 0,
            },
        )
    return sid


def score_dict(row: Any) -> dict[str, Any]:
    """The API shape of a ``scores`` row (``passed`` lifted out of ``details``)."""
    m = row._mapping
    details = orjson.loads(m["details"]) if m["details"] else {}
    passed = details.pop("passed", None) if isinstance(details, dict) else None
    return {
        "id": m["id"],
        "trace_id": m["trace_id"],
        "name": m["name"],
        "value": m["value"],
        "label": m["label"],
        "passed": passed,
        "comment": m["comment"],
        "source": m["source"],
        "evaluator": m["evaluator"],
        "model": m["model"],
        "details": details,
        "created_at_ms": m["created_at_ms"],
        "created_by": m["created_by"],
    }


def get_score(engine: Engine, score_id: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(select(scores).where(scores.c.id == score_id)).first()
    return score_dict(row) if row is not None else None


def get_by_dedup_key(engine: Engine, key: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(select(scores).where(scores.c.dedup_key == key)).first()
    return score_dict(row) if row is not None else None


def trace_scores(engine: Engine, trace_id: str) -> list[dict[str, Any]]:
    """Every score of one trace, oldest first."""
    q = (
        select(scores)
        .where(scores.c.trace_id == trace_id)
        .order_by(scores.c.created_at_ms, scores.c.id)
    )
    with engine.connect() as conn:
        return [score_dict(r) for r in conn.execute(q)]


def _cursor(cursor: str) -> tuple[int, str]:
    ms, sep, sid = cursor.partition(":")
    if not sep or not ms.isdigit() or not sid:
        raise InvalidRequest("'cursor' is not a cursor returned by this API", param="cursor")
    return int(ms), sid


def list_scores(
    engine: Engine,
    *,
    name: str | None = None,
    source: str | None = None,
    model: str | None = None,
    trace_id: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Scores, newest first, one page at a time (``next_cursor``)."""
    if not 1 <= limit <= 1000:
        raise InvalidRequest("'limit' must be between 1 and 1000", param="limit")
    c = scores.c
    conds: list[Any] = []
    for col, v in ((c.name, name), (c.source, source), (c.model, model), (c.trace_id, trace_id)):
        if v is not None:
            conds.append(col == v)
    if since_ms is not None:
        conds.append(c.created_at_ms >= since_ms)
    if until_ms is not None:
        conds.append(c.created_at_ms < until_ms)
    if cursor:
        ms, sid = _cursor(cursor)
        conds.append(or_(c.created_at_ms < ms, and_(c.created_at_ms == ms, c.id < sid)))
    q = (
        select(scores)
        .where(and_(True, *conds))
        .order_by(c.created_at_ms.desc(), c.id.desc())
        .limit(limit + 1)
    )
    with engine.connect() as conn:
        rows = conn.execute(q).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    nxt = f"{rows[-1].created_at_ms}:{rows[-1].id}" if more and rows else None
    return {"data": [score_dict(r) for r in rows], "next_cursor": nxt}


def timeseries(
    engine: Engine,
    name: str,
    *,
    step_ms: int,
    since_ms: int,
    until_ms: int,
    model: str | None = None,
    source: str | None = None,
) -> list[dict[str, Any]]:
    """Per-``step`` buckets of one score name from the minute rollups (empty buckets omitted).

    Each point: ``t`` (bucket start, ms), ``count`` (scores with a value), ``mean``,
    ``passed``, ``failed`` and ``pass_rate`` (None without pass/fail outcomes).
    """
    if step_ms < MINUTE or step_ms % MINUTE:
        raise InvalidRequest("'step' must be whole minutes (1m, 5m, 1h…)", param="step")
    if until_ms <= since_ms:
        raise InvalidRequest("'until' must be after 'since'", param="until")
    if (until_ms - since_ms) // step_ms > MAX_POINTS:
        raise InvalidRequest(f"more than {MAX_POINTS} points: use a larger 'step'", param="step")
    r = score_rollups_minute
    conds = [r.c.name == name, r.c.minute_ms >= since_ms, r.c.minute_ms < until_ms]
    if model is not None:
        conds.append(r.c.model == model)
    if source is not None:
        conds.append(r.c.source == source)
    q = select(r.c.minute_ms, r.c["count"], r.c.value_sum, r.c.passed, r.c.failed).where(*conds)
    acc: dict[int, list[float]] = {}
    with engine.connect() as conn:
        for m, n, s, p, f in conn.execute(q):
            b = acc.setdefault(m // step_ms * step_ms, [0, 0.0, 0, 0])
            b[0] += n
            b[1] += s
            b[2] += p
            b[3] += f
    out = []
    for t in sorted(acc):
        n, s, p, f = acc[t]
        out.append(
            {
                "t": t,
                "count": int(n),
                "mean": s / n if n else None,
                "passed": int(p),
                "failed": int(f),
                "pass_rate": p / (p + f) if p + f else None,
            }
        )
    return out


# -- agreement between raters ------------------------------------------------------


def _latest(
    engine: Engine, name: str, source: str | None, since_ms: int | None, until_ms: int | None
) -> dict[str, dict[str, Any]]:
    """The latest score of ``name`` per trace."""
    c = scores.c
    conds = [c.name == name]
    if source is not None:
        conds.append(c.source == source)
    if since_ms is not None:
        conds.append(c.created_at_ms >= since_ms)
    if until_ms is not None:
        conds.append(c.created_at_ms < until_ms)
    q = (
        select(c.trace_id, c.value, c.label, c.details, c.created_at_ms)
        .where(*conds)
        .order_by(c.created_at_ms.desc(), c.id.desc())
        .limit(MAX_PAIRS)
    )
    out: dict[str, dict[str, Any]] = {}
    with engine.connect() as conn:
        for tid, value, label, details, _ in conn.execute(q):
            if tid in out:
                continue
            d = orjson.loads(details) if details else {}
            out[tid] = {"value": value, "label": label, "passed": d.get("passed")}
    return out


def _pass_fail(s: dict[str, Any]) -> str | None:
    if s["passed"] is not None:
        return "pass" if s["passed"] else "fail"
    if s["value"] in (0, 1):  # thumbs up/down given as 1/0
        return "pass" if s["value"] == 1 else "fail"
    return None


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa of two raters' labels (None when chance agreement is already 1)."""
    n = len(a)
    if n == 0:
        return None
    po = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pe = sum((a.count(k) / n) * (b.count(k) / n) for k in set(a) | set(b))
    if pe >= 1.0:
        return None
    return (po - pe) / (1 - pe)


def _corr(fn: Any, x: list[float], y: list[float]) -> float | None:
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None  # undefined for constant input
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = float(fn(x, y)[0])
    return v if math.isfinite(v) else None


def agreement(
    engine: Engine,
    evaluator: str,
    human: str,
    *,
    evaluator_source: str | None = None,
    human_source: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    top: int = 10,
) -> dict[str, Any]:
    """How far the scores named ``evaluator`` agree with those named ``human`` on the same
    traces (the latest score of each name per trace).

    ``numeric`` (both have values): Pearson and Spearman correlation, mean absolute
    difference. ``categorical``: agreement rate and Cohen's kappa over labels when
    both sides label (most pairs), else over pass/fail (``passed``, or values 1/0).
    ``disagreements``: the traces where they differ most.
    """
    from scipy import stats

    a = _latest(engine, evaluator, evaluator_source, since_ms, until_ms)
    b = _latest(engine, human, human_source, since_ms, until_ms)
    common = sorted(set(a) & set(b))
    pairs = [(t, a[t], b[t]) for t in common]
    out: dict[str, Any] = {
        "evaluator": evaluator,
        "human": human,
        "n": len(pairs),
        "numeric": None,
        "categorical": None,
        "disagreements": [],
    }
    num = [(t, x["value"], y["value"]) for t, x, y in pairs if None not in (x["value"], y["value"])]
    if num:
        xs = [float(x) for _, x, _ in num]
        ys = [float(y) for _, _, y in num]
        out["numeric"] = {
            "n": len(num),
            "pearson": _corr(stats.pearsonr, xs, ys),
            "spearman": _corr(stats.spearmanr, xs, ys),
            "mean_abs_diff": sum(abs(x - y) for x, y in zip(xs, ys, strict=True)) / len(num),
        }
    labelled = [(t, x["label"], y["label"]) for t, x, y in pairs if x["label"] and y["label"]]
    pf = [(t, _pass_fail(x), _pass_fail(y)) for t, x, y in pairs]
    pf = [p for p in pf if p[1] is not None and p[2] is not None]
    cats, basis = (
        (labelled, "label") if labelled and len(labelled) >= len(pf) else (pf, "pass_fail")
    )
    if cats:
        la = [str(x) for _, x, _ in cats]
        lb = [str(y) for _, _, y in cats]
        out["categorical"] = {
            "n": len(cats),
            "basis": basis,
            "agreement": sum(x == y for x, y in zip(la, lb, strict=True)) / len(cats),
            "kappa": cohen_kappa(la, lb),
            "categories": sorted(set(la) | set(lb)),
        }
    diffs: list[tuple[float, str]] = []
    if num:
        diffs = [(abs(float(x) - float(y)), t) for t, x, y in num if x != y]
    elif cats:
        diffs = [(1.0, t) for t, x, y in cats if x != y]
    diffs.sort(key=lambda d: (-d[0], d[1]))
    out["disagreements"] = [
        {"trace_id": t, "difference": d, "evaluator": a[t], "human": b[t]} for d, t in diffs[:top]
    ]
    return out


__all__ = [
    "NewScore",
    "agreement",
    "cohen_kappa",
    "list_scores",
    "score_dict",
    "timeseries",
    "trace_scores",
    "write_score",
]
