"""Drift monitors: compare a window of traffic with a reference, store and export the result.

:class:`DriftRunner` does the work (the daemon, the API and ``keel drift run``
share it): it reads both sides (:mod:`keel.drift.reference`), runs every test
of every feature with enough data on both sides, and stores one ``drift_runs``
row (the whole report as JSON) with one ``drift_scores`` row per feature and
test, plus one per feature with ``test = "feature"`` (its verdict).

False positives. A run makes m decisions (one per numeric or categorical
feature, three per embedding: MMD, topic shares, far-away share); each is held
to ``alpha / m`` (Bonferroni), so a run on identically distributed data calls
drift with probability at most ``alpha`` (bench/drift.py measures it). A
numeric feature must also move materially (PSI ≥ ``psi_threshold``), a
categorical one or the topic shares by a Jensen-Shannon distance ≥
``js_threshold``: with 100k traces a side, a p-value alone flags shifts too
small to matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from sqlalchemy import select
from sqlalchemy.engine import Engine

from keel._ids import new_id
from keel.config import DriftMonitorSettings, DriftSettings
from keel.config.quality import DRIFT_CATEGORICAL, DRIFT_COLUMNS, DRIFT_EMBEDDING, DRIFT_NUMERIC
from keel.daemon import Daemon, now_ms
from keel.drift.features import Embedder
from keel.drift.reference import Sample, load_window, reference_sample
from keel.drift.report import categorical_summary, numeric_summary, topic_examples
from keel.drift.tests import DRIFT_TESTS, TestConfig, TestResult, tests_of_kind
from keel.errors import KeelError, NotFound
from keel.store.tables_quality import drift_runs, drift_scores

log = logging.getLogger("keel.drift")

#: How a feature's verdict follows from its tests: all of them, or any.
VERDICT = {
    "numeric": (all, ("ks", "psi")),
    "categorical": (all, ("chi2", "js")),
    "embedding": (any, ("mmd", "topic")),
}
#: A monitor whose last run failed is tried again after this long (or its interval).
ERROR_RETRY_S = 60.0
KIND = {
    **dict.fromkeys(DRIFT_NUMERIC, "numeric"),
    **dict.fromkeys(DRIFT_CATEGORICAL, "categorical"),
    **dict.fromkeys(DRIFT_EMBEDDING, "embedding"),
}


def _values(sample: Sample, feature: str) -> Any:
    kind = KIND[feature]
    if kind == "numeric":
        x = sample.numeric.get(feature, np.zeros(0))
        return x[~np.isnan(x)]
    if kind == "categorical":
        return [v for v in sample.categorical.get(feature, []) if v is not None]
    return sample.embeddings.get(feature, np.zeros((0, 0), dtype=np.float32))


def _severity(kind: str, tests: dict[str, TestResult]) -> float:
    """How far past its threshold a feature's effect is (1.0: at the threshold)."""
    if kind == "numeric":
        return tests["psi"].statistic / tests["psi"].threshold
    if kind == "categorical":
        return tests["js"].statistic / tests["js"].threshold
    topic = tests["topic"]
    far = topic.details["far"]
    return max(
        topic.statistic / topic.threshold, (far["cur_share"] - far["ref_share"]) / far["margin"]
    )


class DriftRunner:
    """Runs monitors and stores their results (blocking: call from a worker thread)."""

    def __init__(
        self,
        engine: Engine,
        settings: DriftSettings,
        embedder: Embedder,
        datasets: Any = None,
        metrics: DriftMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.embedder = embedder
        self.datasets = datasets
        self.metrics = metrics
        self._cache: dict[Any, Sample] = {}

    def monitor(self, name: str) -> tuple[int, DriftMonitorSettings]:
        for i, m in enumerate(self.settings.monitors):
            if m.name == name:
                return i, m
        known = ", ".join(m.name for m in self.settings.monitors) or "none configured"
        raise NotFound(f"no drift monitor '{name}' (known: {known}; see drift.monitors)")

    # -- computing ---------------------------------------------------------------------------

    def compute(self, name: str, now: int | None = None, *, progress: Any = None) -> dict[str, Any]:
        """One run of monitor ``name`` over the window ending at ``now`` (not stored)."""
        index, m = self.monitor(name)
        s = self.settings
        end = now if now is not None else now_ms()
        start = end - int(m.window * 1000)
        cur = load_window(self.engine, start, end, s, m)
        ref = reference_sample(
            self.engine,
            m,
            index,
            start,
            end,
            s,
            datasets=self.datasets,
            embedder=self.embedder,
            cache=self._cache,
            progress=progress,
        )
        run = {
            "id": new_id(),
            "monitor": m.name,
            "computed_at_ms": now_ms(),
            "window_start_ms": start,
            "window_end_ms": end,
            "reference": ref.source,
            "n_current": cur.n,
            "n_reference": ref.n,
        }
        need = m.min_samples or s.min_samples
        short = [
            f"{side} has {n} traces"
            for side, n in (("the current window", cur.n), ("the reference", ref.n))
            if n < need
        ]
        if short:
            msg = f"{' and '.join(short)}; at least {need} are needed (drift.min_samples)"
            return {**run, "drifted": False, "report": self._status("insufficient_data", msg)}
        report = self.compare(m, ref, cur, seed=zlib.crc32(m.name.encode()))
        report["notes"] = [*ref.notes, *cur.notes, *report["notes"]]
        return {**run, "drifted": report["drifted"], "report": report}

    def _status(self, status: str, message: str) -> dict[str, Any]:
        return {"status": status, "message": message, "drifted": False, "features": []}

    def compare(
        self, m: DriftMonitorSettings, ref: Sample, cur: Sample, seed: int = 0
    ) -> dict[str, Any]:
        """The report of ``ref`` vs ``cur`` for monitor ``m``: every feature with at least
        ``min_samples`` values on both sides, through every test of its kind."""
        s = self.settings
        need = m.min_samples or s.min_samples
        plan, skipped = [], []
        for feature in m.columns or DRIFT_COLUMNS:
            rv, cv = _values(ref, feature), _values(cur, feature)
            if len(rv) < need or len(cv) < need:
                why = f"{len(rv)} reference and {len(cv)} current values; {need} needed"
                if feature in ref.missing or feature in cur.missing:
                    why = ref.missing.get(feature) or cur.missing[feature]
                elif KIND[feature] == "embedding" and not (len(rv) and len(cv)):
                    why = "no embeddings" + (
                        f" ({self.embedder.reason})" if self.embedder.reason else ""
                    )
                elif feature.startswith("retrieval") and not (len(rv) and len(cv)):
                    why = "no retrieval spans linked to these traces"
                skipped.append({"feature": feature, "reason": why})
                continue
            plan.append((feature, KIND[feature], rv, cv))
        m_tests = sum(
            DRIFT_TESTS[t].decisions for _, kind, _, _ in plan for t in tests_of_kind(kind)
        )
        alpha_t = s.alpha / max(m_tests, 1)
        cfg = TestConfig(
            alpha=alpha_t,
            psi_threshold=s.psi_threshold,
            js_threshold=s.js_threshold,
            wasserstein_threshold=s.wasserstein_threshold,
            clusters=s.clusters,
            far_margin=s.far_margin,
            mmd_sample=s.mmd_sample,
            permutations=s.permutations,
            cluster_sample=s.cluster_sample,
            seed=seed,
        )
        features = []
        for feature, kind, rv, cv in plan:
            results = {t: DRIFT_TESTS[t](cfg).run(rv, cv) for t in tests_of_kind(kind)}
            combine, primary = VERDICT[kind]
            drifted = bool(combine(results[t].drifted for t in primary))
            entry: dict[str, Any] = {
                "feature": feature,
                "kind": kind,
                "drifted": drifted,
                "severity": float(_severity(kind, results)),
                "n_ref": len(rv),
                "n_cur": len(cv),
                "tests": {t: r.to_dict() for t, r in results.items()},
            }
            if kind == "numeric":
                entry["summary"] = {"ref": numeric_summary(rv), "cur": numeric_summary(cv)}
            elif kind == "categorical":
                entry["summary"] = categorical_summary(rv, cv)
            else:
                topic = results["topic"]
                entry["topics"] = topic_examples(
                    topic, ref.texts.get(feature, []), cur.texts.get(feature, []), cv
                )
                entry["tests"]["topic"]["details"] = {
                    k: v for k, v in topic.details.items() if k not in ("clusters", "far")
                }
            features.append(entry)
        features.sort(key=lambda f: (not f["drifted"], -f["severity"]))
        drifted = [f["feature"] for f in features if f["drifted"]]
        status = "ok" if features else "insufficient_data"
        return {
            "status": status,
            "message": "" if features else "no feature has enough values on both sides",
            "drifted": bool(drifted),
            "drifted_features": drifted,
            "alpha": s.alpha,
            "tests": m_tests,
            "alpha_per_test": alpha_t,
            "features": features,
            "skipped": skipped,
            "notes": [],
        }

    # -- storing -----------------------------------------------------------------------------

    def run(self, name: str, now: int | None = None, *, progress: Any = None) -> dict[str, Any]:
        """Compute a run and store it. A failure (a configuration or data error) is
        stored as an ``error`` run, so the API and ``keel drift list`` show it, and
        raised again."""
        _, m = self.monitor(name)
        try:
            run = self.compute(name, now, progress=progress)
        except Exception as e:
            msg = (
                e.message
                if isinstance(e, KeelError)
                else f"internal error: {type(e).__name__}: {e}"
            )
            end = now if now is not None else now_ms()
            run = {
                "id": new_id(),
                "monitor": name,
                "computed_at_ms": now_ms(),
                "window_start_ms": end - int(m.window * 1000),
                "window_end_ms": end,
                "reference": {"kind": m.reference.kind},
                "n_current": 0,
                "n_reference": 0,
                "drifted": False,
                "report": self._status("error", msg),
            }
            self.store(run)
            raise
        self.store(run)
        return run

    def store(self, run: dict[str, Any]) -> None:
        rep = run["report"]
        scores = []
        for f in rep.get("features", []):
            base = {"run_id": run["id"], "feature": f["feature"], "monitor": run["monitor"]}
            base["computed_at_ms"] = run["computed_at_ms"]
            for t, r in f["tests"].items():
                scores.append(
                    {
                        **base,
                        "test": t,
                        "statistic": r["statistic"],
                        "p_value": r["p_value"],
                        "threshold": r["threshold"],
                        "drifted": r["drifted"],
                    }
                )
            ps = [r["p_value"] for r in f["tests"].values() if r["p_value"] is not None]
            scores.append(
                {
                    **base,
                    "test": "feature",
                    "statistic": f["severity"],
                    "p_value": min(ps) if ps else None,
                    "threshold": 1.0,
                    "drifted": f["drifted"],
                }
            )
        row = {
            **{k: run[k] for k in ("id", "monitor", "computed_at_ms", "window_start_ms")},
            "window_end_ms": run["window_end_ms"],
            "reference": orjson.dumps(run["reference"]).decode(),
            "n_current": run["n_current"],
            "n_reference": run["n_reference"],
            "drifted": bool(run["drifted"]),
            "report": orjson.dumps(rep, option=orjson.OPT_SERIALIZE_NUMPY).decode(),
        }
        with self.engine.begin() as conn:
            conn.execute(drift_runs.insert().values(**row))
            if scores:
                conn.execute(drift_scores.insert(), scores)
        if self.metrics is not None:
            self.metrics.observe(run)

    def last_run(self, name: str) -> tuple[int, str] | None:
        """(computed_at_ms, status) of the monitor's latest stored run."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(drift_runs.c.computed_at_ms, drift_runs.c.report)
                .where(drift_runs.c.monitor == name)
                .order_by(drift_runs.c.computed_at_ms.desc())
                .limit(1)
            ).first()
        if row is None:
            return None
        status = orjson.loads(row.report).get("status", "ok") if row.report else "ok"
        return int(row.computed_at_ms), status


class DriftMetrics:
    """Prometheus gauges of the latest run of each monitor (in the process that ran it)."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge

        labels = ["monitor", "feature", "test"]
        self.statistic = Gauge(
            "keel_drift_statistic", "Statistic of a drift test in the latest run.", labels,
            registry=registry,
        )  # fmt: skip
        self.p_value = Gauge(
            "keel_drift_p_value", "p-value of a drift test in the latest run.", labels,
            registry=registry,
        )  # fmt: skip
        self.drifted = Gauge(
            "keel_drift_features_drifted", "Features that drifted in the latest run.",
            ["monitor"], registry=registry,
        )  # fmt: skip
        self.last_run = Gauge(
            "keel_drift_last_run_timestamp_seconds", "When the monitor last ran.",
            ["monitor"], registry=registry,
        )  # fmt: skip
        self.runs = Counter(
            "keel_drift_runs", "Drift runs, by outcome.", ["monitor", "status"], registry=registry
        )
        self._labels: dict[str, list[tuple[str, str, str]]] = {}

    def observe(self, run: dict[str, Any]) -> None:
        rep = run["report"]
        name = run["monitor"]
        for key in self._labels.pop(name, []):
            with contextlib.suppress(KeyError):
                self.statistic.remove(*key)
            with contextlib.suppress(KeyError):
                self.p_value.remove(*key)
        keys = []
        for f in rep.get("features", []):
            for t, r in f["tests"].items():
                key = (name, f["feature"], t)
                keys.append(key)
                if r["statistic"] is not None:
                    self.statistic.labels(*key).set(r["statistic"])
                if r["p_value"] is not None:
                    self.p_value.labels(*key).set(r["p_value"])
        self._labels[name] = keys
        if rep.get("status") == "ok":
            self.drifted.labels(name).set(len(rep.get("drifted_features", [])))
        self.last_run.labels(name).set(run["computed_at_ms"] / 1000)
        self.runs.labels(name, rep.get("status", "ok")).inc()


class DriftDaemon(Daemon):
    """Runs each monitor every ``interval`` (on one replica), oldest-due first.

    Whether a monitor is due is read from the store, so a restart or another
    replica taking over neither repeats nor skips a run."""

    name = "drift-monitors"
    singleton = True

    def __init__(self, runner: DriftRunner) -> None:
        intervals = [m.interval for m in runner.settings.monitors] or [60.0]
        self.interval_s = max(1.0, min(60.0, *intervals))
        super().__init__(runner.engine)
        self.runner = runner
        self.errors: dict[str, str] = {}

    async def tick(self) -> None:
        await asyncio.to_thread(self.run_due)

    def run_due(self, now: int | None = None) -> list[str]:
        """Run every monitor whose last run is older than its interval; returns their names."""
        t = now if now is not None else now_ms()
        ran = []
        for m in self.runner.settings.monitors:
            last = self.runner.last_run(m.name)
            if last is not None:
                # A failed run (say, a dataset not imported yet) is retried sooner.
                wait = min(m.interval, ERROR_RETRY_S) if last[1] == "error" else m.interval
                if t - last[0] < wait * 1000:
                    continue
            try:
                self.runner.run(m.name, t)
                self.errors.pop(m.name, None)
            except KeelError as e:
                self.errors[m.name] = e.message
                log.error("drift monitor %s: %s", m.name, e.message)
            except Exception as e:
                self.errors[m.name] = f"{type(e).__name__}: {e}"
                log.exception("drift monitor %s failed", m.name)
            ran.append(m.name)
        return ran


def make_embedder(
    settings: DriftSettings, embed_model_dir: str | None, local_enabled: bool
) -> Embedder:
    """The embedder of drift features: off with ``drift.embeddings`` or ``local.enabled``."""
    if not local_enabled and settings.embeddings:
        e = Embedder(enabled=False)
        e.reason = "the embedded models are off (local.enabled: false)"
        return e
    return Embedder(embed_model_dir, enabled=settings.embeddings, batch=settings.embed_batch)


@dataclass
class DriftParts:
    """What ``create_app`` wires: the runner (API), the daemons, their failures."""

    runner: DriftRunner
    daemons: list[Daemon]
    errors: dict[str, str]


def build_drift(
    engine: Engine,
    settings: DriftSettings,
    registry: Any,
    *,
    datasets: Any,
    embed_model_dir: str | None = None,
    local_enabled: bool = True,
    run_daemons: bool = True,
) -> DriftParts:
    """The featurizer (when ``drift.features_enabled``) and monitor (when monitors are
    configured) daemons, sharing one lazily loaded embedder, and the runner of the API.

    Embeddings use the embedded MiniLM, so they follow ``local.enabled`` too."""
    from keel.drift.features import FeaturizerDaemon

    embedder = make_embedder(settings, embed_model_dir, local_enabled)
    runner = DriftRunner(engine, settings, embedder, datasets, DriftMetrics(registry))
    daemons: list[Daemon] = []
    errors: dict[str, str] = {}
    if run_daemons and settings.features_enabled:
        daemons.append(FeaturizerDaemon(engine, settings, embedder, registry))
    if run_daemons and settings.monitors:
        monitor = DriftDaemon(runner)
        errors = monitor.errors
        daemons.append(monitor)
    return DriftParts(runner, daemons, errors)
