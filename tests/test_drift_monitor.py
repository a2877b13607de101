"""Drift monitors end to end: traces in a real store, the featurizer, monitors with
each kind of reference, stored runs, signals, the REST API, the CLI, an alert.

Synthetic support traffic (keel.drift.synthetic) stands in for production: the
reference is billing questions in English; the current windows shift topic
(shipping), language (French and Spanish) or length, or stay the same.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from keel.alerts.signals import SIGNALS, EvalContext, SignalQuery
from keel.cli import cli
from keel.config import Settings
from keel.daemon import now_ms
from keel.data.versions import DatasetStore
from keel.drift import signals as _signals  # noqa: F401  (registers drift_*)
from keel.drift import synthetic
from keel.drift.features import CURSOR, Embedder, Featurizer
from keel.drift.monitor import DriftDaemon, DriftRunner
from keel.drift.report import render_text
from keel.drift.runs import get_run, list_runs
from keel.errors import ConfigError
from keel.store.engine import make_engine, migrate
from keel.store.tables import spans, traces
from keel.store.tables_quality import cursors, drift_scores, trace_features

HOUR = 3_600_000
NOW = 1_900_000_000_000  # 2030-03-17
REF_START = NOW - 10 * HOUR
SHIPPING_WORDS = ("parcel", "package", "deliver", "courier", "ship", "order", "box", "transit")


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def monitor(name: str, **over: Any) -> dict[str, Any]:
    ref = {"kind": "period", "start": iso(REF_START), "end": iso(REF_START + HOUR)}
    return {"name": name, "window": "1h", "interval": "1h", "reference": ref, **over}


def make_store(root: Path, monitors: list[dict[str, Any]], **drift: Any) -> tuple[Settings, Any]:
    s = Settings.model_validate(
        {
            "data_dir": str(root),
            "local": {"enabled": False},
            "drift": {"scan_delay_s": 0, "min_samples": 30, "monitors": monitors, **drift},
        }
    )
    engine = make_engine(s.effective_database_url)
    migrate(engine)
    return s, engine


def add(engine: Any, texts: list[str], start: int, seed: int, **kw: Any) -> list[dict]:
    rows = synthetic.trace_rows(texts, start, start + HOUR, np.random.default_rng(seed), **kw)
    with engine.begin() as c:
        c.execute(traces.insert(), rows)
    return rows


def billing(n: int, seed: int, **kw: Any) -> list[str]:
    return synthetic.questions("billing", n, np.random.default_rng(seed), **kw)


def signal(engine: Any, name: str, **q: Any) -> dict:
    ctx = EvalContext(engine, now_ms())
    return SIGNALS[name].values(ctx, SignalQuery(window_ms=HOUR, end_ms=now_ms() + 1, **q))


# -- with embeddings: topic, language, same distribution, dataset reference ---------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One store, featurized once with the real MiniLM encoder (skipped without it)."""
    embedder = Embedder()
    if not embedder.available:
        pytest.skip(f"local-embed model not installed: {embedder.reason}")
    root = tmp_path_factory.mktemp("drift")
    names = ("topic", "lang", "same")
    dataset = {"kind": "dataset", "dataset": "faq"}
    s, engine = make_store(
        root, [*(monitor(n) for n in names), monitor("vs-dataset", reference=dataset)]
    )
    rng = np.random.default_rng(11)
    add(engine, billing(40, 1), REF_START, 1)
    add(engine, synthetic.questions("shipping", 40, rng), NOW - HOUR, 2)
    lang = synthetic.mix([("billing", "fr", 0.5), ("billing", "es", 0.5)], 40, rng)
    add(engine, lang, NOW - 3 * HOUR, 3)
    add(engine, billing(40, 4), NOW - 5 * HOUR, 4)
    datasets = DatasetStore(engine, s.artifact_root)
    faq = [
        {
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": f"Echo: {q}"},
            ]
        }
        for q in billing(40, 5)
    ]
    datasets.write_version("faq", "chat", faq)
    featurizer = Featurizer(engine, s.drift, embedder)
    assert featurizer.run(NOW) == 160
    runner = DriftRunner(engine, s.drift, embedder, datasets)
    runs = {
        "topic": runner.run("topic", NOW),
        "lang": runner.run("lang", NOW - 2 * HOUR),
        "same": runner.run("same", NOW - 4 * HOUR),
        "dataset": runner.run("vs-dataset", NOW - 4 * HOUR),
    }
    return {"engine": engine, "runs": runs, "settings": s}


def test_featurizer_embeds_inputs_and_outputs(embedded: dict[str, Any]):
    with embedded["engine"].connect() as c:
        rows = c.execute(sa.select(trace_features)).all()
    assert len(rows) == 160
    assert all(r.input_embedding and r.output_embedding for r in rows)
    assert {r.language for r in rows} >= {"en", "fr", "es"}
    assert all(r.refusal is False and r.input_tokens > 3 for r in rows)


def test_topic_shift_is_detected_with_examples_of_the_new_topic(embedded: dict[str, Any]):
    run = get_run(embedded["engine"], embedded["runs"]["topic"]["id"])
    assert run["drifted"] and run["status"] == "ok"
    assert "input_embedding" in run["drifted_features"]
    assert "language" not in run["drifted_features"]
    feature = next(f for f in run["report"]["features"] if f["feature"] == "input_embedding")
    far = feature["topics"]["far"]
    assert far["moved"] and far["cur_share"] > 0.5 > 0.1 > far["ref_share"]
    assert len(far["examples"]) == 3
    for text in far["examples"]:
        assert any(w in text.lower() for w in SHIPPING_WORDS), text
    about = [t for c in feature["topics"]["clusters"] for t in c["about"]]
    assert about and all(not any(w in t.lower() for w in ("parcel", "courier")) for t in about)
    report = render_text(run)
    assert "of current inputs are far from every reference topic" in report
    assert "DRIFTED: " in report and "input_embedding" in report


def test_language_shift_is_detected(embedded: dict[str, Any]):
    run = get_run(embedded["engine"], embedded["runs"]["lang"]["id"])
    assert "language" in run["drifted_features"]
    lang = next(f for f in run["report"]["features"] if f["feature"] == "language")
    moved = {m["value"]: m for m in lang["summary"]["moved"]}
    assert moved["en"]["ref_share"] > 0.9 and moved["en"]["cur_share"] < 0.1
    assert moved["fr"]["cur_share"] + moved["es"]["cur_share"] > 0.8


def test_identically_distributed_traffic_stays_quiet(embedded: dict[str, Any]):
    run = get_run(embedded["engine"], embedded["runs"]["same"]["id"])
    assert not run["drifted"] and run["status"] == "ok"
    assert run["n_current"] == run["n_reference"] == 40
    names = {f["feature"] for f in run["report"]["features"]}
    assert names == {
        "input_tokens", "output_tokens", "latency_ms", "language", "refusal", "model",
        "input_embedding", "output_embedding",
    }  # fmt: skip
    assert {s["feature"] for s in run["report"]["skipped"]} == {
        "retrieval_top_score",
        "retrieval_count",
    }
    with embedded["engine"].connect() as c:
        verdicts = c.execute(
            sa.select(drift_scores).where(
                drift_scores.c.run_id == run["id"], drift_scores.c.test == "feature"
            )
        ).all()
    assert len(verdicts) == 8 and not any(v.drifted for v in verdicts)


def test_dataset_reference_is_featurized_on_the_fly(embedded: dict[str, Any]):
    run = get_run(embedded["engine"], embedded["runs"]["dataset"]["id"])
    assert run["reference"]["kind"] == "dataset" and run["reference"]["dataset"] == "faq"
    assert run["status"] == "ok" and not run["drifted"]
    names = {f["feature"] for f in run["report"]["features"]}
    assert {"language", "refusal", "input_embedding", "output_embedding"} <= names
    skipped = {s["feature"]: s["reason"] for s in run["report"]["skipped"]}
    assert "token counts" in skipped["input_tokens"] and "latency" in skipped["latency_ms"]


def test_signals_read_each_monitors_latest_run(embedded: dict[str, Any]):
    engine = embedded["engine"]
    detected = signal(engine, "drift_detected", group_by=("monitor",))
    by = {dict(k)["monitor"]: v for k, v in detected.items()}
    assert by["topic"] >= 1 and by["lang"] >= 1 and by["same"] == 0
    psi = signal(engine, "drift_score", filters=(("feature", "language"), ("test", "js")))
    assert psi[()] > 0.5  # the largest JS distance of language: the language shift's
    p = signal(engine, "drift_p_value", filters=(("monitor", "same"), ("test", "ks")))
    assert p[()] > 0.01


# -- without embeddings: length, insufficient data, last week, featurizer details ------------


@pytest.fixture
def plain(tmp_path: Path) -> tuple[Settings, Any, DriftRunner]:
    s, engine = make_store(
        tmp_path,
        [
            monitor("length"),
            monitor("weekly", reference={"kind": "last_week"}),
            monitor("lost", reference={"kind": "dataset", "dataset": "nope@1234"}),
        ],
        embeddings=False,
    )
    runner = DriftRunner(engine, s.drift, Embedder(enabled=False), DatasetStore(engine, "mem"))
    return s, engine, runner


def test_length_shift_and_last_week_reference(plain: tuple[Settings, Any, DriftRunner]):
    s, engine, runner = plain
    add(engine, billing(40, 1), REF_START, 1)
    add(engine, billing(40, 2, long=True), NOW - HOUR, 2)
    add(engine, billing(40, 3), NOW - 7 * 24 * HOUR - HOUR, 3)
    Featurizer(engine, s.drift, runner.embedder).run(NOW)
    run = runner.run("length", NOW)
    assert run["drifted"] and run["report"]["drifted_features"][:2] == [
        "input_tokens",
        "output_tokens",
    ]
    tokens = run["report"]["features"][0]
    assert tokens["summary"]["cur"]["p50"] > 3 * tokens["summary"]["ref"]["p50"]
    skipped = {x["feature"]: x["reason"] for x in run["report"]["skipped"]}
    assert "drift.embeddings: false" in skipped["input_embedding"]
    weekly = runner.run("weekly", NOW)
    assert weekly["reference"] == {
        "kind": "last_week",
        "start_ms": NOW - HOUR - 7 * 24 * HOUR,
        "end_ms": NOW - 7 * 24 * HOUR,
    }
    assert weekly["n_reference"] == 40 and "input_tokens" in weekly["report"]["drifted_features"]
    empty = runner.run("weekly", REF_START + HOUR)  # nothing was recorded a week before
    assert empty["n_current"] == 40 and empty["n_reference"] == 0
    assert empty["report"]["status"] == "insufficient_data"


def test_insufficient_data_is_recorded_without_alerting(plain: tuple[Settings, Any, DriftRunner]):
    s, engine, runner = plain
    add(engine, billing(40, 1), REF_START, 1)
    add(engine, billing(10, 2), NOW - HOUR, 2)
    Featurizer(engine, s.drift, runner.embedder).run(NOW)
    run = runner.run("length", NOW)
    assert not run["drifted"] and run["n_current"] == 10
    stored = get_run(engine, run["id"])
    assert stored["status"] == "insufficient_data"
    assert "current window has 10 traces; at least 30" in stored["message"]
    assert "insufficient data" in render_text(stored)
    assert signal(engine, "drift_detected") == {}  # no data: no alert


def test_unknown_reference_dataset_is_a_clear_error(plain: tuple[Settings, Any, DriftRunner]):
    _, engine, runner = plain
    with pytest.raises(ConfigError, match=r"drift\.monitors\.2 \(lost\)\.reference\.dataset: "):
        runner.run("lost", NOW)
    [stored] = list_runs(engine, "lost")
    assert stored["status"] == "error" and "no dataset" in stored["message"]
    daemon = DriftDaemon(runner)
    t = now_ms()
    assert daemon.run_due(t) == ["length", "weekly"]  # "lost" failed a moment ago
    assert daemon.run_due(t + 30_000) == []  # the others ran within their interval (1h)
    assert daemon.run_due(t + 61_000) == ["lost"]  # failures are retried after a minute
    assert "drift.monitors.2 (lost)" in daemon.errors["lost"]


def test_featurizer_details(plain: tuple[Settings, Any, DriftRunner]):
    s, engine, runner = plain
    rows = add(engine, billing(6, 1), NOW - HOUR, 1)
    rows[0]["otel_trace_id"] = "a" * 32
    with engine.begin() as c:
        c.execute(traces.update().where(traces.c.id == rows[0]["id"]), {"otel_trace_id": "a" * 32})
        c.execute(traces.update().where(traces.c.id == rows[1]["id"]), {"request_body": "{oops"})
        c.execute(traces.update().where(traces.c.id == rows[2]["id"]), {"status": "error"})
        base = {"trace_id": "a" * 32, "kind": "retrieval", "start_us": 0, "end_us": 1}
        c.execute(
            spans.insert(),
            [
                {**base, "span_id": "1" * 16, "name": "search", "duration_ms": 1.0,
                 "status": "ok", "result_count": 4, "top_score": 0.71},
                {**base, "span_id": "2" * 16, "name": "rerank", "duration_ms": 1.0,
                 "status": "ok", "result_count": 2, "top_score": 0.93},
            ],
        )  # fmt: skip
    f = Featurizer(engine, s.drift, runner.embedder)
    assert f.step(NOW) == 5  # the failed call is not a sample of the traffic
    with engine.connect() as c:
        got = {r.trace_id: r for r in c.execute(sa.select(trace_features))}
        position = c.execute(sa.select(cursors.c.position)).scalar()
    assert len(got) == 5 and position.endswith(rows[-1]["id"])
    assert got[rows[0]["id"]].retrieval_top_score == 0.93
    assert got[rows[0]["id"]].retrieval_count == 4
    broken = got[rows[1]["id"]]  # a body that is not JSON: the numbers are kept
    assert broken.language is None and broken.input_tokens == rows[1]["prompt_tokens"]
    # A crash between the write and the cursor, replayed: no duplicate, no error.
    with engine.begin() as c:
        c.execute(sa.delete(cursors).where(cursors.c.name == CURSOR))
    assert f.step(NOW) == 5
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(trace_features)).scalar() == 5


def test_featurizer_waits_for_late_traces_and_samples(tmp_path: Path):
    s, engine = make_store(tmp_path, [], embeddings=False, scan_delay_s=60, sample_rate=0.0)
    add(engine, billing(5, 1), NOW - HOUR, 1)
    recent = add(engine, billing(3, 2), NOW - 30_000, 2)  # the hour's end is still to come
    add(engine, billing(4, 3), NOW - 30 * 24 * HOUR, 3)  # history before drift.backfill (8d)
    f = Featurizer(engine, s.drift, Embedder(enabled=False))
    assert f.run(NOW) == 5 and f.featurized == 0  # sampled out, cursor moved
    assert f.run(max(r["started_at_ms"] for r in recent) + 60_001) == 3


def test_postgres_store(pg_url: str, tmp_path: Path):
    s = Settings.model_validate(
        {
            "data_dir": str(tmp_path),
            "database_url": pg_url,
            "drift": {"scan_delay_s": 0, "min_samples": 30, "embeddings": False,
                      "monitors": [monitor("length")]},
        }
    )  # fmt: skip
    engine = make_engine(s.effective_database_url)
    migrate(engine)
    add(engine, billing(40, 1), REF_START, 1)
    add(engine, billing(40, 2, long=True), NOW - HOUR, 2)
    f = Featurizer(engine, s.drift, Embedder(enabled=False))
    assert f.run(NOW) == 80
    with engine.begin() as c:
        c.execute(sa.delete(cursors))
    assert f.run(NOW) == 80  # replayed over rows already there: ignored
    run = DriftRunner(engine, s.drift, Embedder(enabled=False)).run("length", NOW)
    assert "input_tokens" in run["report"]["drifted_features"]
    assert signal(engine, "drift_detected") == {(): float(len(run["report"]["drifted_features"]))}
    engine.dispose()


# -- a real server: gateway traffic, featurizer daemon, API, metrics, alert, CLI ------------


def _wait(fn: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_server_api_metrics_alert_and_cli(keel_factory: Any, tmp_path: Path):
    now = now_ms()
    ref = {"kind": "period", "start": iso(now - 3 * HOUR), "end": iso(now - 2 * HOUR)}
    drift = {
        "scan_interval_s": 0.1,
        "scan_delay_s": 0,
        "embeddings": False,
        "min_samples": 20,
        "monitors": [{"name": "len", "window": "1h", "interval": "1h", "reference": ref}],
    }
    rule = {
        "name": "drifting",
        "signal": "drift_detected",
        "condition": {"op": "above", "threshold": 0},
        "window": "1h",
    }
    k = keel_factory(drift=drift, alerts={"evaluation_interval_s": 0.2, "rules": [rule]})
    with k.state.engine.begin() as c:  # last hour's reference traffic, recorded earlier
        c.execute(
            traces.insert(),
            synthetic.trace_rows(
                billing(30, 1), now - 3 * HOUR, now - 2 * HOUR, np.random.default_rng(1)
            ),
        )
    with httpx.Client(base_url=k.url, timeout=10) as client:
        for q in billing(30, 2, long=True):  # today's questions come with long stories
            r = client.post(
                "/v1/chat/completions",
                json={"model": "gpt", "messages": [{"role": "user", "content": q}]},
            )
            assert r.status_code == 200
        k.flush()
        _wait(lambda: len(k.rows("trace_features")) == 60)

        mons = client.get("/api/drift/monitors").json()
        assert mons["data"][0]["name"] == "len" and mons["embeddings"].startswith(
            "embeddings are off"
        )
        run = client.post("/api/drift/monitors/len/run")
        assert run.status_code == 200, run.text
        body = run.json()
        assert body["drifted"] and body["drifted_features"][0] in ("input_tokens", "output_tokens")
        assert body["n_current"] == body["n_reference"] == 30
        listed = client.get("/api/drift/runs", params={"monitor": "len"}).json()["data"]
        assert body["id"] in [x["id"] for x in listed] and "report" not in listed[0]
        full = client.get(f"/api/drift/runs/{body['id']}").json()
        assert full["report"]["features"][0]["tests"]["ks"]["p_value"] < 1e-6
        assert client.get("/api/drift/monitors").json()["data"][0]["last_run"]["drifted"]
        missing = client.get("/api/drift/runs/nope")
        assert missing.status_code == 404 and "no drift run" in missing.json()["error"]["message"]
        assert client.post("/api/drift/monitors/nope/run").status_code == 404
        assert client.get("/api/drift/runs", params={"limit": 0}).status_code == 400
        metrics = client.get("/metrics").text
        assert 'keel_drift_statistic{feature="input_tokens",monitor="len",test="psi"}' in metrics
        assert 'keel_drift_features_drifted{monitor="len"}' in metrics

        def firing() -> bool:
            alerts = client.get("/api/alerts", params={"state": "firing"}).json()["data"]
            return any(a["rule"] == "drifting" for a in alerts)

        _wait(firing)

    cfg = tmp_path / "keel.yaml"
    cfg.write_text(
        orjson.dumps(
            {"data_dir": k.settings.data_dir, "local": {"enabled": False}, "drift": drift}
        ).decode()
    )
    runner = CliRunner()
    res = runner.invoke(cli, ["drift", "report", "len", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "DRIFTED: input_tokens" in res.output or "DRIFTED: output_tokens" in res.output
    assert "median" in res.output
    res = runner.invoke(cli, ["drift", "run", "len", "--config", str(cfg), "--json"])
    assert res.exit_code == 0 and orjson.loads(res.output)["drifted"]
    res = runner.invoke(cli, ["drift", "list", "--config", str(cfg)])
    assert res.exit_code == 0 and res.output.count(" len ") >= 2
    res = runner.invoke(cli, ["drift", "run", "nope", "--config", str(cfg)])
    assert res.exit_code == 1 and res.output.startswith("error: no drift monitor 'nope'")
    res = runner.invoke(cli, ["drift", "report", "--run", "nope", "--config", str(cfg)])
    assert res.exit_code == 1 and "no drift run 'nope'" in res.output


def test_bad_monitor_config_at_start_and_in_config_check(keel_factory: Any, tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        orjson.dumps(
            {"drift": {"monitors": [{"name": "x", "reference": {"kind": "dataset"}}]}}
        ).decode()
    )
    res = CliRunner().invoke(cli, ["config", "check", "--config", str(bad)])
    assert res.exit_code == 1
    assert "drift.monitors.0.reference: kind 'dataset' needs" in res.output
    mon = {"name": "lost", "interval": "1h", "reference": {"kind": "dataset", "dataset": "nope"}}
    k = keel_factory(drift={"monitors": [mon], "embeddings": False})

    def error() -> str | None:
        return httpx.get(f"{k.url}/api/drift/monitors").json()["data"][0]["error"]

    msg = _wait(error)
    assert msg.startswith("drift.monitors.0 (lost).reference.dataset: no dataset 'nope'")
    last = httpx.get(f"{k.url}/api/drift/monitors").json()["data"][0]["last_run"]
    assert last["status"] == "error"
    now = httpx.post(f"{k.url}/api/drift/monitors/lost/run")
    assert now.status_code == 409  # the server is fine; its configuration names a missing dataset
    assert now.json()["error"]["message"].startswith("drift.monitors.0 (lost).reference.dataset")


def test_keels_own_traffic_is_not_featurized(plain: tuple[Settings, Any, DriftRunner]):
    # Experiments, deploy validations and judges call models through the gateway;
    # their inputs are not the application's and must not look like drift.
    s, engine, runner = plain
    app_rows = add(engine, billing(5, 1), NOW - HOUR, 1)
    own = add(engine, billing(6, 2), NOW - HOUR, 2)
    with engine.begin() as c:
        for i, r in enumerate(own):
            feature = "eval:support-qa" if i % 2 else "keel:judge:helpful"
            c.execute(traces.update().where(traces.c.id == r["id"]), {"feature": feature})
    Featurizer(engine, s.drift, runner.embedder).run(NOW)
    with engine.connect() as c:
        ids = {r[0] for r in c.execute(sa.text("SELECT trace_id FROM trace_features"))}
    assert ids == {r["id"] for r in app_rows}
