"""Storage of experiments: runs, their items, the output cache, and run summaries.

Writes are batched: the runner hands over a few dozen finished items at a time
and each batch is one transaction (items, cache entries and the run's
``items_done``), so an interruption loses at most the batch in flight and a
resumed run knows exactly which items are stored.

How failures count in a summary (and in comparisons):

- an item whose model call failed (``error`` set) is not scored; it counts as
  **0** in every metric's mean and as an ``error`` of that metric, so a model
  that fails does not look better by having its failures left out;
- an item whose call succeeded but that an evaluator could not score (value
  None: a judge that failed, an output that is not a number…) is left out of
  that metric's mean and counted as ``unscored``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from keel._ids import new_id
from keel.daemon import now_ms
from keel.errors import InvalidRequest, NotFound
from keel.evals import stats
from keel.store.jsontext import dumps as _dumps
from keel.store.jsontext import loads as _loads
from keel.store.tables import traces
from keel.store.tables_quality import eval_cache, eval_items, eval_runs

_IN_CHUNK = 500  # ids per IN (...) query: well under SQLite's variable limit
_JSON_COLUMNS = ("params", "config", "summary")


def _chunks(seq: Sequence[Any], n: int = _IN_CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _insert_ignore(conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """Insert rows, skipping those whose primary key is already stored."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    conn.execute(insert(table).on_conflict_do_nothing(), rows)


def run_dict(r: Any, *, config: bool = False) -> dict[str, Any]:
    """A stored run as JSON-ready data (``config``: include the whole suite)."""
    m = {str(k): v for k, v in r._mapping.items()}  # plain str keys (orjson)
    for k in _JSON_COLUMNS:
        m[k] = _loads(m.get(k))
    if not config:
        m.pop("config", None)
    return m


def item_dict(r: Any) -> dict[str, Any]:
    """A stored item with its JSON columns parsed."""
    m = {str(k): v for k, v in r._mapping.items()}  # plain str keys (orjson)
    for k in ("input", "expected", "scores"):
        m[k] = _loads(m.get(k))
    m["cached"] = bool(m.get("cached"))
    return m


class RunStore:
    """Experiment runs and items over a SQLAlchemy engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- runs ----------------------------------------------------------------

    def create_run(
        self,
        *,
        suite: str,
        target: str,
        resume_key: str,
        dataset_version_id: str,
        model: str | None,
        prompt_ref: str | None,
        params: dict[str, Any],
        config: dict[str, Any],
        items_total: int,
        created_by: str | None = None,
    ) -> str:
        rid = new_id()
        with self.engine.begin() as c:
            c.execute(
                eval_runs.insert().values(
                    id=rid,
                    suite=suite,
                    target=target,
                    resume_key=resume_key,
                    dataset_version_id=dataset_version_id,
                    model=model,
                    prompt_ref=prompt_ref,
                    params=_dumps(params),
                    config=_dumps(config),
                    status="running",
                    items_total=items_total,
                    items_done=0,
                    started_at_ms=now_ms(),
                    created_by=created_by,
                )
            )
        return rid

    def find_resumable(self, resume_key: str) -> dict[str, Any] | None:
        """The newest unfinished run with this resume key, if any."""
        q = (
            sa.select(eval_runs)
            .where(eval_runs.c.resume_key == resume_key, eval_runs.c.status == "running")
            .order_by(eval_runs.c.id.desc())
            .limit(1)
        )
        with self.engine.connect() as c:
            r = c.execute(q).first()
        return run_dict(r) if r else None

    def get(self, ref: str) -> dict[str, Any]:
        """A run by id or unambiguous id prefix (≥ 4 characters); NotFound otherwise."""
        ref = (ref or "").strip().lower()
        if len(ref) < 4:
            raise InvalidRequest(f"run id {ref!r} is too short; give at least 4 characters")
        with self.engine.connect() as c:
            r = c.execute(sa.select(eval_runs).where(eval_runs.c.id == ref)).first()
            if r is None:
                rows = c.execute(
                    sa.select(eval_runs).where(eval_runs.c.id.startswith(ref, autoescape=True))
                    .limit(2)
                ).all()  # fmt: skip
                if len(rows) > 1:
                    raise InvalidRequest(f"run id prefix {ref!r} is ambiguous; give more of it")
                r = rows[0] if rows else None
        if r is None:
            raise NotFound(f"no eval run {ref!r} (see `keel eval list`)")
        return run_dict(r, config=True)

    def list(
        self,
        *,
        suite: str | None = None,
        status: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Runs newest first; ``cursor`` is the last id of the previous page."""
        q = sa.select(eval_runs).order_by(eval_runs.c.id.desc()).limit(limit + 1)
        if suite:
            q = q.where(eval_runs.c.suite == suite)
        if status:
            q = q.where(eval_runs.c.status == status)
        if cursor:
            q = q.where(eval_runs.c.id < cursor)
        with self.engine.connect() as c:
            rows = c.execute(q).all()
        out = [run_dict(r) for r in rows[:limit]]
        return out, (out[-1]["id"] if len(rows) > limit else None)

    def finish(self, run_id: str, summary: dict[str, Any], status: str = "completed") -> None:
        with self.engine.begin() as c:
            done = c.execute(
                sa.select(sa.func.count()).select_from(eval_items)
                .where(eval_items.c.run_id == run_id)
            ).scalar_one()  # fmt: skip
            c.execute(
                eval_runs.update()
                .where(eval_runs.c.id == run_id)
                .values(status=status, summary=_dumps(summary), items_done=done,
                        finished_at_ms=now_ms())
            )  # fmt: skip

    # -- items ---------------------------------------------------------------

    def done_keys(self, run_id: str) -> set[str]:
        with self.engine.connect() as c:
            return set(
                c.execute(
                    sa.select(eval_items.c.item_key).where(eval_items.c.run_id == run_id)
                ).scalars()
            )

    def write_batch(
        self, run_id: str, items: list[dict[str, Any]], cache_rows: list[dict[str, Any]]
    ) -> None:
        """Store finished items (and new cache entries) in one transaction."""
        if not items and not cache_rows:
            return
        with self.engine.begin() as c:
            if items:
                c.execute(eval_items.insert(), items)
                c.execute(
                    eval_runs.update()
                    .where(eval_runs.c.id == run_id)
                    .values(items_done=eval_runs.c.items_done + len(items))
                )
            _insert_ignore(c, eval_cache, cache_rows)

    def items(
        self, run_id: str, *, after: int | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Items of a run in dataset order; ``after``: only those past that position."""
        q = sa.select(eval_items).where(eval_items.c.run_id == run_id).order_by(eval_items.c.idx)
        if after is not None:
            q = q.where(eval_items.c.idx > after)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as c:
            return [item_dict(r) for r in c.execute(q)]

    def update_scores(self, run_id: str, scores: dict[str, dict[str, Any]]) -> None:
        """Replace the scores of some items (``{item_key: scores}``)."""
        if not scores:
            return
        stmt = (
            eval_items.update()
            .where(eval_items.c.run_id == sa.bindparam("r"),
                   eval_items.c.item_key == sa.bindparam("k"))
            .values(scores=sa.bindparam("s"))
        )  # fmt: skip
        with self.engine.begin() as c:
            c.execute(stmt, [{"r": run_id, "k": k, "s": _dumps(v)} for k, v in scores.items()])

    # -- the output cache ----------------------------------------------------

    def cache_get(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Stored outputs by cache key (batched reads)."""
        out: dict[str, dict[str, Any]] = {}
        uniq = sorted(set(keys))
        with self.engine.connect() as c:
            for chunk in _chunks(uniq):
                q = sa.select(eval_cache.c.key, eval_cache.c.response).where(
                    eval_cache.c.key.in_(chunk)
                )
                for k, v in c.execute(q):
                    out[k] = orjson.loads(v)
        return out

    # -- costs ---------------------------------------------------------------

    def trace_costs(self, trace_ids: Sequence[str]) -> dict[str, float | None]:
        """``{trace id: cost_usd}`` of the recorded traces among ``trace_ids``."""
        out: dict[str, float | None] = {}
        uniq = sorted(set(trace_ids))
        with self.engine.connect() as c:
            for chunk in _chunks(uniq):
                q = sa.select(traces.c.id, traces.c.cost_usd).where(traces.c.id.in_(chunk))
                out.update({i: cost for i, cost in c.execute(q)})
        return out

    def set_costs(self, run_id: str, costs: dict[str, float]) -> None:
        """Set ``cost_usd`` of items by ``{item_key: cost}``."""
        if not costs:
            return
        stmt = (
            eval_items.update()
            .where(eval_items.c.run_id == sa.bindparam("r"),
                   eval_items.c.item_key == sa.bindparam("k"))
            .values(cost_usd=sa.bindparam("c"))
        )  # fmt: skip
        with self.engine.begin() as c:
            c.execute(stmt, [{"r": run_id, "k": k, "c": v} for k, v in costs.items()])


# -- summaries ----------------------------------------------------------------


def metric_values(item: dict[str, Any], metric: str) -> float | None:
    """The value that counts for ``metric`` (0 for a failed call, None when unscored)."""
    if item.get("error"):
        return 0.0
    s = (item.get("scores") or {}).get(metric)
    if not isinstance(s, dict) or s.get("value") is None:
        return None
    return float(s["value"])


def summarize(
    items: list[dict[str, Any]],
    metrics: list[str],
    *,
    seed: int = stats.DEFAULT_SEED,
    resamples: int = stats.DEFAULT_RESAMPLES,
) -> dict[str, Any]:
    """Per-metric means with CI95, pass rates, counts; tokens, cost and latency."""
    n_items = len(items)
    errors = sum(1 for it in items if it.get("error"))
    out_metrics: dict[str, Any] = {}
    for m in metrics:
        vals: list[float] = []
        passed = judged = unscored = 0
        for it in items:
            v = metric_values(it, m)
            if v is None:
                unscored += 1
                continue
            vals.append(v)
            s = (it.get("scores") or {}).get(m) or {}
            if not it.get("error") and s.get("passed") is not None:
                judged += 1
                passed += bool(s["passed"])
        lo, hi = stats.bootstrap_ci(vals, seed=seed, resamples=resamples)
        out_metrics[m] = {
            "mean": (sum(vals) / len(vals)) if vals else None,
            "ci_low": lo,
            "ci_high": hi,
            # Failed calls count as failed checks, when the evaluator passes/fails at all.
            "pass_rate": (passed / (judged + errors)) if judged else None,
            "n": len(vals),
            "errors": errors,
            "unscored": unscored,
        }
    pt = sum(it.get("prompt_tokens") or 0 for it in items)
    ct = sum(it.get("completion_tokens") or 0 for it in items)
    costs = [it["cost_usd"] for it in items if it.get("cost_usd") is not None]
    spent = [it["cost_usd"] for it in items if it.get("cost_usd") is not None and not it["cached"]]
    lat = [it["latency_ms"] for it in items if it.get("latency_ms") is not None]
    return {
        "items": n_items,
        "errors": errors,
        "cached": sum(1 for it in items if it.get("cached")),
        "metrics": out_metrics,
        "tokens": {"prompt": pt, "completion": ct, "total": pt + ct},
        "cost_usd": sum(costs) if costs else None,
        "cost_per_item_usd": (sum(costs) / len(costs)) if costs else None,
        "cost_known": len(costs),
        "spent_usd": sum(spent) if spent else (0.0 if costs else None),
        "latency_ms": {
            "p50": stats.percentile(lat, 50),
            "p95": stats.percentile(lat, 95),
            "mean": (sum(lat) / len(lat)) if lat else None,
        },
    }


def evaluate_gates(summary: dict[str, Any], thresholds: dict[str, float]) -> list[dict[str, Any]]:
    """One gate per threshold: the metric's mean must be ≥ the threshold."""
    gates = []
    for metric, th in thresholds.items():
        mean = ((summary.get("metrics") or {}).get(metric) or {}).get("mean")
        gates.append(
            {"metric": metric, "threshold": th, "value": mean,
             "passed": mean is not None and mean >= th}
        )  # fmt: skip
    return gates
