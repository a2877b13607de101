"""Metrics, summaries from rollups, the resource sampler, retention and daemon leases."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from keel._ids import new_id
from keel.cli import cli
from keel.config import RetentionSettings
from keel.daemon import Daemon, Lease
from keel.monitoring import summary as sm
from keel.monitoring.sampler import GPUReader, ResourceSampler
from keel.store.engine import make_engine, migrate
from keel.store.recorder import Recorder
from keel.store.retention import purge
from keel.store.tables import rollups_minute


def scrape(keel) -> dict[tuple[str, tuple], float]:
    text = httpx.get(keel.url + "/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def chat(keel, content="hi", model="gpt", **headers):
    return httpx.post(
        keel.url + "/v1/chat/completions",
        headers=headers,
        timeout=10,
        json={"model": model, "messages": [{"role": "user", "content": content}]},
    )


def test_prometheus_metrics_follow_the_traffic(keel):
    for _ in range(3):
        assert chat(keel).status_code == 200
    assert chat(keel, "[[fake: error=500]]").status_code == 502
    assert (
        httpx.post(
            keel.url + "/v1/chat/completions",
            json={"model": "gpt", "stream": True, "messages": [{"role": "user", "content": "a b"}]},
        ).status_code
        == 200
    )
    keel.flush()
    m = scrape(keel)
    lbl = lambda **kw: tuple(sorted(kw.items()))  # noqa: E731
    ok = ("keel_requests_total", lbl(model="gpt", provider="fake", endpoint="chat", status="ok"))
    assert m[ok] == 4
    err = (
        "keel_requests_total",
        lbl(model="gpt", provider="fake", endpoint="chat", status="error"),
    )
    assert m[err] == 1
    assert (
        m[
            (
                "keel_request_errors_total",
                lbl(model="gpt", provider="fake", error_type="upstream_error"),
            )
        ]
        == 1
    )
    assert (
        m[
            (
                "keel_request_duration_seconds_count",
                lbl(model="gpt", provider="fake", endpoint="chat"),
            )
        ]
        == 5
    )
    assert m[("keel_time_to_first_token_seconds_count", lbl(model="gpt", provider="fake"))] == 1
    assert m[("keel_tokens_total", lbl(model="gpt", provider="fake", direction="completion"))] > 0
    assert m[("keel_inflight_requests", lbl(endpoint="chat"))] == 0
    assert m[("keel_recorder_traces_total", lbl(outcome="written"))] == 5
    assert m[("keel_store_up", ())] == 1
    # no unbounded labels: user ids never become label values
    text = httpx.get(keel.url + "/metrics").text
    assert "user" not in {k for (_, labels) in m for k, _ in labels}
    assert "# TYPE keel_requests_total counter" in text


def test_inflight_gauge_counts_open_streams(keel):
    with httpx.stream(
        "POST",
        keel.url + "/v1/chat/completions",
        json={
            "model": "gpt",
            "stream": True,
            "messages": [{"role": "user", "content": "[[fake: words=30, chunk_delay=20]]"}],
        },
    ) as r:
        lines = r.iter_lines()  # one iterator: dropping one closes the response
        next(lines)
        assert scrape(keel)[("keel_inflight_requests", (("endpoint", "chat"),))] == 1
        assert len(list(lines)) > 30
    assert scrape(keel)[("keel_inflight_requests", (("endpoint", "chat"),))] == 0


def test_summary_and_timeseries_from_rollups(keel):
    for i in range(6):
        chat(keel, **{"X-Keel-User": f"u{i % 2}", "X-Keel-Feature": "search"})
    chat(keel, "[[fake: error=503]]", model="claude", **{"X-Keel-Feature": "chat"})
    keel.flush()
    api = keel.url + "/api/metrics/summary"
    by_model = {d["group"]: d for d in httpx.get(api, params={"window": "5m"}).json()["data"]}
    assert by_model["gpt"]["requests"] == 6 and by_model["gpt"]["errors"] == 0
    assert by_model["claude"]["error_rate"] == 1.0
    assert by_model["gpt"]["latency_p50_ms"] is not None
    assert by_model["gpt"]["latency_p50_ms"] <= by_model["gpt"]["latency_p99_ms"]
    s = httpx.get(api, params={"window": "1h", "group_by": "feature"}).json()
    assert {d["group"]: d["requests"] for d in s["data"]} == {"search": 6, "chat": 1}
    s = httpx.get(api, params={"window": "1h", "group_by": "user"}).json()
    assert {d["group"]: d["requests"] for d in s["data"]} == {"u0": 3, "u1": 3}
    s = httpx.get(api, params={"window": "24h", "group_by": "none"}).json()
    assert s["total"]["requests"] == 7 and s["total"]["rps"] > 0
    s = httpx.get(api, params={"window": "1h", "group_by": "provider", "model": "gpt"}).json()
    assert [d["group"] for d in s["data"]] == ["fake"]

    ts = httpx.get(
        keel.url + "/api/metrics/timeseries",
        params={"metric": "requests", "window": "15m", "step": "5m", "group_by": "model"},
    ).json()
    series = {x["group"]: x["points"] for x in ts["series"]}
    assert sum(v for _, v in series["gpt"]) == 6 and len(series["gpt"]) in (3, 4)
    ts = httpx.get(
        keel.url + "/api/metrics/timeseries", params={"metric": "latency_p95_ms", "window": "5m"}
    ).json()
    assert any(v is not None for _, v in ts["series"][0]["points"])

    for params, needle in [
        ({"window": "2y"}, "window"),
        ({"group_by": "colour"}, "group_by"),
        ({"group_by": "user", "model": "gpt"}, "group_by"),
    ]:
        r = httpx.get(api, params=params)
        assert r.status_code == 400 and needle in r.json()["error"]["message"]
    r = httpx.get(keel.url + "/api/metrics/timeseries", params={"metric": "vibes"})
    assert r.status_code == 400 and "metric" in r.json()["error"]["message"]
    r = httpx.get(
        keel.url + "/api/metrics/timeseries",
        params={"metric": "requests", "window": "30d", "step": "1m"},
    )
    assert r.status_code == 400 and "larger step" in r.json()["error"]["message"]

    res = CliRunner().invoke(cli, ["stats", "--url", keel.url, "--window", "1h"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[1].split()[0] == "MODEL" and lines[2].split()[:2] == ["gpt", "6"]
    assert lines[-1].split()[:2] == ["TOTAL", "7"]


def _old_traces(engine, tmp_path, n, start_ms, spacing_ms, **over):
    rec = Recorder(engine, tmp_path / "spill", batch_size=500)
    rec.start()
    for i in range(n):
        rec.record(
            {
                "id": new_id(),
                "started_at_ms": start_ms + i * spacing_ms,
                "duration_ms": 50.0 + i % 100,
                "endpoint": "chat",
                "model": f"m{i % 3}",
                "provider": "p",
                "status": "ok" if i % 10 else "error",
                "http_status": 200,
                "total_tokens": 10,
                **over,
            }
        )
    assert rec.flush()
    rec.stop()


def test_hourly_and_minute_paths_agree(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/k.db")
    migrate(engine)
    now = int(time.time() * 1000)
    _old_traces(engine, tmp_path, 3000, now - 20 * 3_600_000, 24_000)  # 20 h of traffic
    s = sm.summary(engine, window="24h", group_by="model", now_ms=now)  # uses hourly rows
    with engine.connect() as c:
        direct = dict(
            c.execute(
                sa.select(rollups_minute.c.model, sa.func.sum(rollups_minute.c.requests)).group_by(
                    rollups_minute.c.model
                )
            ).all()
        )
    assert {d["group"]: d["requests"] for d in s["data"]} == direct
    assert s["total"]["requests"] == 3000 and s["total"]["errors"] == 300
    ts = sm.timeseries(engine, metric="requests", window="24h", step="1h", now_ms=now)
    assert sum(v for _, v in ts["series"][0]["points"]) == 3000


def test_resource_sampler_stores_and_exports(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/k.db")
    migrate(engine)
    registry = CollectorRegistry()
    gpu = GPUReader()
    sampler = ResourceSampler(engine, registry, interval_s=1, gpu=gpu)

    async def go():
        await sampler.run_once()
        await sampler.run_once()

    asyncio.run(go())
    assert sampler.stats.failures == 0, sampler.stats.last_error
    with engine.connect() as c:
        rows = [dict(r._mapping) for r in c.execute(sa.text("SELECT * FROM resource_samples"))]
    assert len(rows) == 2
    assert rows[-1]["process_rss_bytes"] > 10_000_000 and rows[-1]["host_mem_total_bytes"] > 0
    assert rows[-1]["loop_lag_ms"] >= 0
    assert registry.get_sample_value("keel_process_resident_memory_bytes") > 0
    if not gpu.available:  # this machine: no GPU, reported as absent, not an error
        assert rows[-1]["gpu"] is None and gpu.reason
        assert registry.get_sample_value("keel_gpu_present") == 0
    else:
        assert registry.get_sample_value("keel_gpu_present") == 1


def test_resources_api_after_a_sample(keel):
    deadline = time.time() + 15
    while time.time() < deadline:
        data = httpx.get(keel.url + "/api/resources").json()["data"]
        if data:
            break
        time.sleep(0.1)
    assert data and data[0]["process_rss_bytes"] > 0


def test_retention_deletes_only_what_is_old(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/k.db")
    migrate(engine)
    now = int(time.time() * 1000)
    day = 86_400_000
    _old_traces(engine, tmp_path, 450, now - 40 * day, 1000)  # 40 days old
    _old_traces(engine, tmp_path, 50, now - 3_600_000, 1000)  # an hour old
    with engine.begin() as c:
        c.execute(
            sa.text(
                "INSERT INTO spans (trace_id, span_id, name, kind, start_us, end_us, "
                "duration_ms, status) VALUES ('a'||:i, 'b', 'x', 'chain', :s, :s, 0, "
                "'ok')"
            ),
            [{"i": str(i), "s": (now - 40 * day) * 1000} for i in range(5)]
            + [{"i": "new", "s": now * 1000}],
        )
    deleted = purge(engine, RetentionSettings(days=30, rollup_days=35, batch_size=100), now=now)
    assert deleted["traces"] == 450 and deleted["spans"] == 5
    assert deleted["rollups_minute"] > 0 and deleted["rollups_hour"] > 0
    with engine.connect() as c:
        assert c.execute(sa.text("SELECT COUNT(*) FROM traces")).scalar() == 50
        assert c.execute(sa.text("SELECT COUNT(*) FROM spans")).scalar() == 1
        assert c.execute(sa.text("SELECT SUM(requests) FROM rollups_minute")).scalar() == 50
    # rollups outlive raw data when rollup_days > days
    _old_traces(engine, tmp_path, 10, now - 40 * day, 1000)
    purge(engine, RetentionSettings(days=30, rollup_days=400), now=now)
    with engine.connect() as c:
        assert c.execute(sa.text("SELECT SUM(requests) FROM rollups_minute")).scalar() == 60


def test_retention_covers_quality_tables(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/k.db")
    migrate(engine)
    now = int(time.time() * 1000)
    day = 86_400_000
    with engine.begin() as c:
        for i, age in enumerate((40, 1)):
            t = now - age * day
            c.execute(
                sa.text("INSERT INTO trace_features (trace_id, started_at_ms) VALUES (:i, :t)"),
                {"i": f"f{i}", "t": t},
            )
            c.execute(
                sa.text(
                    "INSERT INTO eval_jobs (id, trace_id, evaluator, status, attempts, "
                    "next_attempt_ms, created_at_ms) VALUES (:i, :i, 'e', 'done', 1, :t, :t)"
                ),
                {"i": f"j{i}", "t": t},
            )
        for i, age in enumerate((500, 40)):  # scores are history: kept like rollups
            c.execute(
                sa.text(
                    "INSERT INTO scores (id, trace_id, name, value, source, created_at_ms) "
                    "VALUES (:i, 't', 'q', 1.0, 'human', :t)"
                ),
                {"i": f"s{i}", "t": now - age * day},
            )
    deleted = purge(engine, RetentionSettings(days=30, rollup_days=400), now=now)
    assert deleted["trace_features"] == 1 and deleted["eval_jobs"] == 1
    assert deleted["scores"] == 1
    with engine.connect() as c:
        assert c.execute(sa.text("SELECT id FROM scores")).scalars().all() == ["s1"]
        assert c.execute(sa.text("SELECT trace_id FROM trace_features")).scalar() == "f1"


def test_lease_is_exclusive_and_expires(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/k.db")
    migrate(engine)
    a = Lease(engine, "job", holder="a", ttl_s=0.3)
    b = Lease(engine, "job", holder="b", ttl_s=0.3)
    assert a.acquire() and not b.acquire()
    assert a.acquire()  # renewal
    time.sleep(0.4)
    assert b.acquire() and not a.acquire()
    b.release()
    assert a.acquire()


def test_failing_daemon_keeps_running_and_only_one_leader(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/k.db")
    migrate(engine)

    class Flaky(Daemon):
        name = "flaky"
        interval_s = 0.02
        singleton = True

        async def tick(self):
            raise RuntimeError("boom")

    async def go():
        d1, d2 = Flaky(engine), Flaky(engine)
        d2._lease.holder = "other-replica"
        d1.start()
        d2.start()
        deadline = time.monotonic() + 10
        while d1.stats.ticks + d2.stats.ticks < 3 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        await d1.stop()
        await d2.stop()
        return d1, d2

    d1, d2 = asyncio.run(go())
    leaders = [d for d in (d1, d2) if d.stats.ticks]
    assert len(leaders) == 1
    assert leaders[0].stats.failures == leaders[0].stats.ticks >= 3
    assert leaders[0].stats.last_error == "RuntimeError: boom"


@pytest.mark.postgres
def test_summary_on_postgres(keel_factory, pg_url):
    keel = keel_factory(database_url=pg_url)
    for _ in range(3):
        chat(keel, **{"X-Keel-User": "p"})
    keel.flush()
    s = httpx.get(keel.url + "/api/metrics/summary", params={"group_by": "user"}).json()
    assert s["data"][0]["group"] == "p" and s["data"][0]["requests"] == 3
    ts = httpx.get(
        keel.url + "/api/metrics/timeseries",
        params={"metric": "error_rate", "window": "1h", "step": "5m"},
    ).json()
    assert ts["series"][0]["points"]
