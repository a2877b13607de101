"""The recorder and the store: batching, rollups, spill and replay, exactly once."""

from __future__ import annotations

import time

import httpx
import orjson
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from conftest import set_pg_connections
from keel._ids import new_id
from keel.store.engine import current_revision, head_revision, make_engine, migrate
from keel.store.recorder import Recorder
from keel.store.rollups import percentile
from keel.store.tables import LAT_COLS, metadata


def trace(i: int = 0, **over):
    t = {
        "id": new_id(),
        "started_at_ms": int(time.time() * 1000),
        "duration_ms": 10.0 + i,
        "endpoint": "chat",
        "model": "m",
        "provider": "p",
        "status": "ok",
        "http_status": 200,
        "stream": False,
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "tokens_estimated": False,
        "request_body": "x" * 100,
    }
    t.update(over)
    return t


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        eng = make_engine(f"sqlite:///{tmp_path}/k.db")
    else:
        eng = make_engine(request.getfixturevalue("pg_url"))
    migrate(eng)
    yield eng
    eng.dispose()


def count(engine, table="traces"):
    with engine.connect() as c:
        return c.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar()


def rollup_requests(engine):
    with engine.connect() as c:
        return c.execute(sa.text("SELECT COALESCE(SUM(requests), 0) FROM rollups_minute")).scalar()


def test_migrations_match_metadata_and_are_idempotent(engine):
    assert current_revision(engine) == head_revision()
    migrate(engine)  # second run is a no-op
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diffs == []


def test_batches_and_rollups(engine, tmp_path):
    rec = Recorder(engine, tmp_path / "spill", batch_size=50, flush_interval_s=0.02)
    rec.start()
    for i in range(230):
        rec.record(trace(i, status="error" if i % 10 == 0 else "ok", ttft_ms=5.0))
    assert rec.flush()
    rec.stop()
    assert count(engine) == 230 and rec.stats.written == 230 and rec.stats.batches >= 5
    with engine.connect() as c:
        rows = [dict(r._mapping) for r in c.execute(sa.text("SELECT * FROM rollups_minute"))]
    assert sum(r["requests"] for r in rows) == 230
    assert sum(r["errors"] for r in rows) == 23
    assert sum(r["total_tokens"] for r in rows) == 230 * 5
    assert sum(r["ttft_count"] for r in rows) == 230
    hist = [sum(r[c] for r in rows) for c in LAT_COLS]
    assert sum(hist) == 230
    # durations are 10..239 ms: the median is ~124 ms; buckets are ±20 %
    p50 = percentile(hist, 0.5)
    assert 100 <= p50 <= 150


def test_percentile_of_fixed_buckets():
    assert percentile([0] * 34, 0.5) is None
    h = [0] * 34
    h[12] = 100  # all in (86.5, 129.7] ms
    assert 86 <= percentile(h, 0.01) <= percentile(h, 0.99) <= 130


def test_queue_full_spills_and_replays_exactly_once(engine, tmp_path):
    rec = Recorder(
        engine,
        tmp_path / "spill",
        queue_size=10,
        batch_size=5,
        flush_interval_s=0.02,
        replay_interval_s=0.05,
    )
    for i in range(25):  # writer not started yet: 15 overflow into the spill file
        rec.record(trace(i))
    assert rec.stats.spilled == 15 and rec.queue_depth == 10
    rec.start()
    deadline = time.time() + 10
    while count(engine) < 25 and time.time() < deadline:
        time.sleep(0.05)
    rec.stop()
    assert count(engine) == 25 and rollup_requests(engine) == 25
    assert rec.stats.replayed == 15 and rec.stats.dropped == 0
    assert rec.spill_files() == []


def test_replay_after_crash_skips_duplicates_and_torn_lines(engine, tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    already = trace(0)
    rec0 = Recorder(engine, spill)
    rec0.start()
    rec0.record(already)
    rec0.stop()
    assert count(engine) == 1
    # a previous process spilled `already` too (committed, then crashed before
    # removing the file), plus 3 more, and died mid-line.
    lines = [orjson.dumps(t) for t in (already, trace(1), trace(2), trace(3))]
    (spill / f"traces-{new_id()}.jsonl").write_bytes(b"\n".join(lines) + b'\n{"id": "to')
    rec = Recorder(engine, spill, flush_interval_s=0.02)
    rec.start()
    deadline = time.time() + 10
    while rec.spill_files() and time.time() < deadline:
        time.sleep(0.02)
    rec.stop()
    assert count(engine) == 4 and rollup_requests(engine) == 4
    assert rec.stats.replayed == 3 and rec.stats.dropped == 1


def test_unwritable_spill_counts_drops(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/k.db")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the spill directory should be")
    rec = Recorder(engine, blocker / "spill", queue_size=1)
    rec.record(trace(0))
    rec.record(trace(1))  # queue full → spill → cannot → dropped, counted, no exception
    assert rec.stats.dropped == 1 and rec.stats.last_error.startswith("spill failed")


@pytest.mark.postgres
def test_store_down_calls_succeed_spill_and_replay_exactly_once(keel_factory, pg_url):
    keel = keel_factory(
        database_url=pg_url, recorder={"flush_interval_s": 0.05, "replay_interval_s": 0.2}
    )
    for i in range(5):
        assert (
            httpx.post(
                keel.url + "/v1/chat/completions",
                json={"model": "gpt", "messages": [{"role": "user", "content": f"before {i}"}]},
            ).status_code
            == 200
        )
    keel.flush()
    set_pg_connections(pg_url, allow=False)
    try:
        ids = []
        for i in range(20):
            r = httpx.post(
                keel.url + "/v1/chat/completions",
                json={
                    "model": "gpt",
                    "stream": i % 2 == 0,
                    "messages": [{"role": "user", "content": f"during {i}"}],
                },
            )
            assert r.status_code == 200  # the caller never notices
            ids.append(r.headers["x-keel-trace-id"])
        keel.flush()
        stats = httpx.get(keel.url + "/api/recorder").json()
        assert stats["spilled"] == 20 and stats["store_up"] is False
        assert httpx.get(keel.url + "/readyz").status_code == 503
    finally:
        set_pg_connections(pg_url, allow=True)
    deadline = time.time() + 15
    while time.time() < deadline:
        if httpx.get(keel.url + "/api/recorder").json()["replayed"] == 20:
            break
        time.sleep(0.1)
    stats = httpx.get(keel.url + "/api/recorder").json()
    assert stats["replayed"] == 20 and stats["dropped"] == 0 and stats["spill_files"] == 0
    rows = keel.rows()
    assert len(rows) == 25 and len({r["id"] for r in rows}) == 25
    assert set(ids) <= {r["id"] for r in rows}
    assert keel.rows("rollups_minute")  # rollups were rebuilt from the replayed rows
    assert sum(r["requests"] for r in keel.rows("rollups_minute")) == 25
    assert httpx.get(keel.url + "/readyz").status_code == 200


@pytest.mark.postgres
def test_gateway_on_postgres(keel_factory, pg_url):
    keel = keel_factory(database_url=pg_url)
    r = httpx.post(
        keel.url + "/v1/chat/completions",
        headers={"X-Keel-User": "pg"},
        json={"model": "claude", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 200
    (t,) = keel.rows()
    assert t["user_id"] == "pg" and t["provider"] == "claude" and t["prompt_tokens"] > 0
    page = httpx.get(keel.url + "/api/traces", params={"user": "pg"}).json()
    assert page["data"][0]["id"] == r.headers["x-keel-trace-id"]
