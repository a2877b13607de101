"""Runs in the store: create, update, parameters, metric points, inputs, comparison.

The server side of tracked runs; the REST API (``keel.runs.api``) is its only
caller in a running Keel, and the SDK (``keel.runs.sdk``) talks to that API.
Artifact files are in ``keel.runs.artifacts``.
"""

from __future__ import annotations

import itertools
import math
import operator
import re
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from keel._ids import new_id
from keel.daemon import now_ms
from keel.errors import Conflict, InvalidRequest, NotFound
from keel.runs._keys import check_key
from keel.store.jsontext import dumps as _dumps
from keel.store.jsontext import loads as _loads
from keel.store.tables_registry import run_metrics, run_params, runs

STATUSES = ("pending", "running", "finished", "failed", "killed")
TERMINAL = frozenset({"finished", "failed", "killed"})
MAX_POINTS_PER_BATCH = 10_000
MAX_PARAM_BYTES = 64 * 1024
MAX_COMPARE = 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/ ]{0,199}$")


def check_run_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequest(
            f"invalid run name {name!r}: use letters, digits, '.', '_', '-', '/' and spaces "
            "(≤200, starting with a letter or digit)",
            param="name",
        )
    return name


def _value(v: Any, key: str) -> float | None:
    """A metric value as stored: a finite float, or None for NaN/inf (and JSON null)."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise InvalidRequest(f"metric '{key}': value must be a number, not {v!r}", param="value")
    f = float(v)
    return f if math.isfinite(f) else None


def downsample(points: Sequence[Any], max_points: int) -> list[Any]:
    """At most ``max_points`` evenly spaced points, always keeping the first and last."""
    n = len(points)
    if n <= max_points or max_points < 2:
        return list(points[-max_points:] if max_points == 1 else points)
    step = (n - 1) / (max_points - 1)
    return [points[round(i * step)] for i in range(max_points)]


_COLS = "(run_id, key, step, value, ts_ms)"


def _insert_points(c: Connection, rows: list[tuple[Any, ...]]) -> None:
    """Straight to the driver, in the caller's transaction: SQLAlchemy's per-row
    parameter processing would cost more than the insert. PostgreSQL gets COPY."""
    if c.dialect.name == "postgresql":
        cur = c.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            with cur.copy(f"COPY {run_metrics.name} {_COLS} FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        finally:
            cur.close()
        return
    c.exec_driver_sql(f"INSERT INTO {run_metrics.name} {_COLS} VALUES (?, ?, ?, ?, ?)", rows)


class RunStore:
    """Runs, parameters and metric points in ``engine``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- runs --------------------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        experiment: str | None = None,
        pipeline_run_id: str | None = None,
        status: str = "running",
        params: dict[str, Any] | None = None,
        tags: dict[str, Any] | None = None,
        code: dict[str, Any] | None = None,
        environment: dict[str, Any] | None = None,
        host: str | None = None,
        created_by: str | None = None,
        started_at_ms: int | None = None,
    ) -> dict[str, Any]:
        """A new run (``pending`` when a pipeline prepares it for a process to attach)."""
        check_run_name(name)
        if experiment is not None:
            check_run_name(experiment)
        if status not in ("pending", "running"):
            raise InvalidRequest("a new run is 'pending' or 'running'", param="status")
        rid = new_id()
        with self.engine.begin() as c:
            c.execute(
                runs.insert().values(
                    id=rid,
                    name=name,
                    experiment=experiment,
                    pipeline_run_id=pipeline_run_id,
                    status=status,
                    tags=_dumps(tags or {}),
                    inputs=_dumps({"datasets": [], "prompts": []}),
                    code=_dumps(code),
                    environment=_dumps(environment),
                    metrics=_dumps({}),
                    host=host,
                    created_by=created_by,
                    started_at_ms=started_at_ms or now_ms(),
                )
            )
            if params:
                self._put_params(c, rid, params)
        return self.get(rid)

    def _row(self, c: Connection, run_id: str, *, lock: bool = False) -> Any:
        q = sa.select(runs).where(runs.c.id == run_id)
        r = c.execute(q.with_for_update() if lock else q).first()
        if r is None:
            raise NotFound(f"no run '{run_id}' (see `keel runs list`)", param="run_id")
        return r

    @staticmethod
    def _out(r: Any, *, full: bool = True) -> dict[str, Any]:
        d = dict(r._mapping)
        for k in ("tags", "inputs", "code", "environment", "metrics"):
            d[k] = _loads(d[k])
        end = d["ended_at_ms"] or (None if d["status"] in TERMINAL else now_ms())
        d["duration_ms"] = None if end is None else max(0, end - d["started_at_ms"])
        if not full:
            d.pop("environment")
        return d

    def get(self, run_id: str) -> dict[str, Any]:
        """One run with its parameters (``params``)."""
        with self.engine.connect() as c:
            d = self._out(self._row(c, run_id))
            d["params"] = self._params(c, run_id)
        return d

    def update(
        self,
        run_id: str,
        *,
        status: str | None = None,
        error: str | None = None,
        ended_at_ms: int | None = None,
        tags: dict[str, Any] | None = None,
        code: dict[str, Any] | None = None,
        environment: dict[str, Any] | None = None,
        host: str | None = None,
    ) -> dict[str, Any]:
        """Change status (a finished, failed or killed run stays so), merge tags, set
        code/environment (a process attaching to a pipeline's run sends them)."""
        if status is not None and status not in STATUSES:
            raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}", param="status")
        with self.engine.begin() as c:
            # The first statement writes, so SQLite takes its lock before the read.
            c.execute(runs.update().where(runs.c.id == run_id).values(id=run_id))
            r = self._row(c, run_id, lock=True)
            values: dict[str, Any] = {}
            if status is not None and status != r.status:
                if r.status in TERMINAL:
                    raise Conflict(
                        f"run '{run_id}' is already {r.status}; start a new run instead",
                        param="status",
                    )
                if status == "pending":
                    raise Conflict(f"run '{run_id}' is {r.status}; it cannot go back to pending")
                values["status"] = status
                if status in TERMINAL:
                    values["ended_at_ms"] = ended_at_ms or now_ms()
            if error is not None:
                values["error"] = error[:20_000]
            if tags:
                values["tags"] = _dumps({**(_loads(r.tags) or {}), **tags})
            if code is not None:
                values["code"] = _dumps(code)
            if environment is not None:
                values["environment"] = _dumps(environment)
            if host is not None:
                values["host"] = host[:200]
            if values:
                c.execute(runs.update().where(runs.c.id == run_id).values(**values))
        return self.get(run_id)

    def list(
        self,
        *,
        name: str | None = None,
        experiment: str | None = None,
        status: str | None = None,
        pipeline_run_id: str | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Runs, newest first (without the package lists)."""
        q = sa.select(runs).order_by(runs.c.started_at_ms.desc(), runs.c.id.desc()).limit(limit)
        for col, v in (
            (runs.c.name, name),
            (runs.c.experiment, experiment),
            (runs.c.status, status),
            (runs.c.pipeline_run_id, pipeline_run_id),
        ):
            if v is not None:
                q = q.where(col == v)
        with self.engine.connect() as c:
            return [self._out(r, full=False) for r in c.execute(q)]

    # -- parameters ----------------------------------------------------------------

    def _params(self, c: Connection, run_id: str) -> dict[str, Any]:
        q = sa.select(run_params.c.key, run_params.c.value).where(run_params.c.run_id == run_id)
        return {k: _loads(v) for k, v in c.execute(q.order_by(run_params.c.key))}

    def _put_params(self, c: Connection, run_id: str, params: dict[str, Any]) -> None:
        have = self._params(c, run_id)
        new = []
        for k, v in params.items():
            check_key(k, "parameter")
            text = orjson.dumps(v, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
            if len(text) > MAX_PARAM_BYTES:
                raise InvalidRequest(f"parameter '{k}' is over 64 KiB as JSON", param=k)
            if k in have:
                if orjson.dumps(have[k], option=orjson.OPT_SORT_KEYS) != text:
                    raise Conflict(
                        f"parameter '{k}' is already {have[k]!r} in run '{run_id}'; a run's "
                        "parameters do not change (start a new run)",
                        param=k,
                    )
                continue
            new.append({"run_id": run_id, "key": k, "value": text.decode()})
        if new:
            c.execute(run_params.insert(), new)

    def log_params(self, run_id: str, params: dict[str, Any]) -> dict[str, Any]:
        """Add parameters; logging the same value again is fine, a different one is 409."""
        if not isinstance(params, dict):
            raise InvalidRequest("params must be an object")
        with self.engine.begin() as c:
            c.execute(runs.update().where(runs.c.id == run_id).values(id=run_id))
            self._row(c, run_id)
            self._put_params(c, run_id, params)
            return self._params(c, run_id)

    # -- metrics -------------------------------------------------------------------

    def log_metrics(self, run_id: str, points: Iterable[dict[str, Any]]) -> int:
        """Append points ``{key, value, step, ts_ms?}``; keeps the latest per key on the run.

        All or nothing: one bad point rejects the batch."""
        now = now_ms()
        rows: list[tuple[str, str, int, float | None, int]] = []
        keys_ok: set[str] = set()
        latest_new: dict[str, tuple[int, int, float | None]] = {}
        for p in points:
            key = p.get("key")
            if key not in keys_ok:  # a batch repeats a few keys: check each once
                keys_ok.add(check_key(key))
            step = p.get("step", 0)
            if type(step) is not int or step < 0:
                raise InvalidRequest(f"metric '{key}': step must be an integer ≥ 0", param="step")
            ts = p.get("ts_ms") or now
            if type(ts) is not int:
                raise InvalidRequest(f"metric '{key}': ts_ms must be epoch ms", param="ts_ms")
            v = p.get("value")
            value = v if type(v) is float and math.isfinite(v) else _value(v, key)
            rows.append((run_id, key, step, value, ts))
            cur = latest_new.get(key)
            if cur is None or (step, ts) >= cur[:2]:
                latest_new[key] = (step, ts, value)
        if len(rows) > MAX_POINTS_PER_BATCH:
            raise InvalidRequest(f"at most {MAX_POINTS_PER_BATCH} points per request")
        if not rows:
            with self.engine.connect() as c:
                self._row(c, run_id)
            return 0
        with self.engine.begin() as c:
            c.execute(runs.update().where(runs.c.id == run_id).values(id=run_id))
            r = self._row(c, run_id, lock=True)
            _insert_points(c, rows)
            latest = _loads(r.metrics) or {}
            for key, (step, ts, value) in latest_new.items():
                cur = latest.get(key)
                if cur is None or (step, ts) >= (cur["step"], cur["ts_ms"]):
                    latest[key] = {"value": value, "step": step, "ts_ms": ts}
            c.execute(runs.update().where(runs.c.id == run_id).values(metrics=_dumps(latest)))
        return len(rows)

    def metric_history(
        self, run_id: str, keys: Sequence[str] | None = None, *, max_points: int = 10_000
    ) -> dict[str, list[dict[str, Any]]]:
        """Points per key in step order, each key downsampled to ``max_points``."""
        out: dict[str, list[tuple[int, float | None, int]]] = {}
        with self.engine.connect() as c:
            self._row(c, run_id)
            # Read straight from the covering index through the driver: a long curve
            # is thousands of rows, and per-row processing would dominate.
            mark = "?" if c.dialect.paramstyle == "qmark" else "%s"
            sql = f"SELECT key, step, value, ts_ms FROM {run_metrics.name} WHERE run_id = {mark}"
            args: list[Any] = [run_id]
            if keys:
                sql += f" AND key IN ({', '.join([mark] * len(keys))})"
                args += list(keys)
            cur = c.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cur.execute(sql + " ORDER BY key, step, ts_ms", tuple(args))
                rows = cur.fetchall()
            finally:
                cur.close()
        for k, group in itertools.groupby(rows, key=operator.itemgetter(0)):
            out[k] = [r[1:] for r in group]
        return {
            k: [{"step": st, "value": v, "ts_ms": ts} for st, v, ts in downsample(pts, max_points)]
            for k, pts in out.items()
        }

    # -- inputs --------------------------------------------------------------------

    def add_inputs(
        self,
        run_id: str,
        *,
        datasets: Sequence[dict[str, Any]] = (),
        prompts: Sequence[dict[str, Any]] = (),
    ) -> dict[str, Any]:
        """Record resolved dataset versions and prompt versions the run used (deduplicated)."""
        with self.engine.begin() as c:
            c.execute(runs.update().where(runs.c.id == run_id).values(id=run_id))
            r = self._row(c, run_id, lock=True)
            inputs = _loads(r.inputs) or {"datasets": [], "prompts": []}
            for kind, items in (("datasets", datasets), ("prompts", prompts)):
                have = {d["id"] for d in inputs.setdefault(kind, [])}
                inputs[kind] += [d for d in items if d["id"] not in have]
            c.execute(runs.update().where(runs.c.id == run_id).values(inputs=_dumps(inputs)))
        return inputs

    # -- comparison ----------------------------------------------------------------

    def compare(
        self, ids: Sequence[str], *, curves: Sequence[str] = (), max_points: int = 500
    ) -> dict[str, Any]:
        """Parameters and final metrics side by side (one list entry per run, in ``ids``
        order), which of them differ, and the requested metric curves."""
        ids = list(dict.fromkeys(ids))
        if not 1 <= len(ids) <= MAX_COMPARE:
            raise InvalidRequest(f"compare 1 to {MAX_COMPARE} runs", param="ids")
        got = [self.get(i) for i in ids]
        pkeys = sorted({k for r in got for k in r["params"]})
        mkeys = sorted(
            {k for r in got for k in r["metrics"]}, key=lambda k: (k.startswith("system/"), k)
        )

        def differs(vals: list[Any]) -> bool:
            return len({orjson.dumps(v, option=orjson.OPT_SORT_KEYS) for v in vals}) > 1

        params = {k: [r["params"].get(k) for r in got] for k in pkeys}
        metrics = {k: [(r["metrics"].get(k) or {}).get("value", None) for r in got] for k in mkeys}
        out_curves: dict[str, dict[str, list[list[Any]]]] = {}
        for key in curves:
            check_key(key)
            out_curves[key] = {}
            for r in got:
                pts = self.metric_history(r["id"], [key], max_points=max_points).get(key, [])
                out_curves[key][r["id"]] = [[p["step"], p["value"]] for p in pts]
        summary_keys = (
            "id",
            "name",
            "experiment",
            "status",
            "started_at_ms",
            "ended_at_ms",
            "duration_ms",
            "code",
            "inputs",
        )
        return {
            "runs": [{k: r[k] for k in summary_keys} for r in got],
            "params": params,
            "params_differ": [k for k, v in params.items() if differs(v)],
            "metrics": metrics,
            "metrics_differ": [k for k, v in metrics.items() if differs(v)],
            "curves": out_curves,
        }
