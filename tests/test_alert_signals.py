"""Alert signals over real stores: rollups written by the recorder, health, resources, spans."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy import event, insert

from keel._ids import new_id
from keel.alerts.signals import SIGNALS, EvalContext, SignalQuery
from keel.alerts.sources import describe_signals, rollup_range, validate_rule
from keel.config import RuleSettings
from keel.store.engine import make_engine, migrate
from keel.store.recorder import Recorder
from keel.store.tables import component_checks, resource_samples, spans, traces

MIN = 60_000
HOUR = 3_600_000
DAY = 86_400_000
# A fixed instant 30 s into a minute: the current minute is half over.
NOW = 1_700_000_040_000 + 30_000
W5 = 5 * MIN
ROLLUP_SIGNALS = [
    "requests",
    "rps",
    "errors",
    "error_rate",
    "latency_mean_ms",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "ttft_p99_ms",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "tokens_per_minute",
    "cost_usd",
    "cost_per_hour_usd",
]


def trace(ts: int, model: str = "a", **over: Any) -> dict[str, Any]:
    t = {
        "id": new_id(),
        "started_at_ms": ts,
        "duration_ms": 100.0,
        "endpoint": "chat",
        "model": model,
        "provider": "p1",
        "status": "ok",
        "http_status": 200,
        "stream": False,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "tokens_estimated": False,
        "cost_usd": 0.002,
    }
    t.update(over)
    return t


@pytest.fixture
def engine(tmp_path) -> Iterator[sa.Engine]:
    eng = make_engine(f"sqlite:///{tmp_path}/k.db")
    migrate(eng)
    yield eng
    eng.dispose()


def record(engine: sa.Engine, spill_dir: Any, rows: list[dict[str, Any]]) -> None:
    """Write traces the way the gateway does: through the recorder (traces + rollups)."""
    rec = Recorder(engine, spill_dir, flush_interval_s=0.01)
    rec.start()
    for r in rows:
        rec.record(r)
    assert rec.flush(10)
    rec.stop()
    assert rec.stats.written == len(rows) and rec.stats.spilled == 0


def sig(
    engine: sa.Engine,
    name: str,
    *,
    window_ms: int = W5,
    end_ms: int = NOW,
    filters: dict[str, str] | None = None,
    group_by: tuple[str, ...] = (),
    ctx: EvalContext | None = None,
) -> dict:
    ctx = ctx or EvalContext(engine, end_ms)
    q = SignalQuery(window_ms, end_ms, tuple(sorted((filters or {}).items())), group_by)
    return SIGNALS[name].values(ctx, q)


def by(label: str, values: dict) -> dict[str, Any]:
    """{(('model','a'),): v} → {'a': v}."""
    return {dict(k)[label]: v for k, v in values.items()}


@contextlib.contextmanager
def count_queries(engine: sa.Engine) -> Iterator[list[str]]:
    seen: list[str] = []

    def listen(conn, cursor, statement, params, context, executemany):
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", listen)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", listen)


# -- rollup metrics -----------------------------------------------------------------------


@pytest.fixture
def traffic(engine, tmp_path) -> sa.Engine:
    """In the 5-minute window: a 10 calls (2 errors) via p1, b 4 calls via p2 (embeddings);
    a minute before the window: 3 failed calls of a that must not count."""
    rows = []
    for i in range(10):
        rows.append(
            trace(
                NOW - 4 * MIN + i * 20_000,
                "a",
                duration_ms=50.0 + 10 * i,
                status="error" if i in (3, 7) else "ok",
            )
        )
    for i in range(4):
        rows.append(
            trace(NOW - 2 * MIN + i, "b", provider="p2", endpoint="embeddings", cost_usd=0.01)
        )
    start, _ = rollup_range(SignalQuery(W5, NOW))
    rows += [trace(start - 30_000 + i, "a", status="error") for i in range(3)]
    record(engine, tmp_path / "spill", rows)
    return engine


def test_error_rate_and_counts_per_model(traffic):
    e = traffic
    assert by("model", sig(e, "error_rate", group_by=("model",))) == {"a": 0.2, "b": 0.0}
    assert by("model", sig(e, "requests", group_by=("model",))) == {"a": 10, "b": 4}
    assert by("model", sig(e, "errors", group_by=("model",))) == {"a": 2, "b": 0}
    assert sig(e, "requests") == {(): 14}
    assert sig(e, "requests", filters={"provider": "p2"}) == {(): 4}
    assert sig(e, "error_rate", filters={"endpoint": "chat"}) == {(): 0.2}
    assert sig(e, "prompt_tokens") == {(): 140}
    assert sig(e, "completion_tokens") == {(): 70}
    assert sig(e, "total_tokens", group_by=("provider",)) == {
        (("provider", "p1"),): 150,
        (("provider", "p2"),): 60,
    }
    assert sig(e, "cost_usd")[()] == pytest.approx(10 * 0.002 + 4 * 0.01)
    assert sig(e, "latency_mean_ms", filters={"model": "a"}) == {(): pytest.approx(95.0)}
    # Two labels: keys are sorted (label, value) pairs.
    assert sig(e, "requests", group_by=("provider", "model")) == {
        (("model", "a"), ("provider", "p1")): 10,
        (("model", "b"), ("provider", "p2")): 4,
    }
    # Rates divide by the time covered so far: 4 whole minutes + 30 s of the current one.
    assert sig(e, "rps") == {(): pytest.approx(14 / 270)}
    assert sig(e, "tokens_per_minute") == {(): pytest.approx(210 * 60 / 270)}
    assert sig(e, "cost_per_hour_usd")[()] == pytest.approx(0.06 * 3600 / 270)
    # A wider window takes in the earlier failures.
    assert by("model", sig(e, "errors", window_ms=10 * MIN, group_by=("model",))) == {
        "a": 5,
        "b": 0,
    }


def test_percentiles_from_histograms(engine, tmp_path):
    rows = [
        trace(NOW - 3 * MIN + i, "p", duration_ms=float(i + 1), stream=True, ttft_ms=(i + 1) * 0.6)
        for i in range(1000)
    ]
    rows += [trace(NOW - 3 * MIN, "nostream", duration_ms=10.0)]
    record(engine, tmp_path / "spill", rows)
    f = {"model": "p"}
    for name, exact in [
        ("latency_p50_ms", 500),
        ("latency_p95_ms", 950),
        ("latency_p99_ms", 990),
        ("ttft_p50_ms", 300),
        ("ttft_p95_ms", 570),
        ("ttft_p99_ms", 594),
    ]:
        got = sig(engine, name, filters=f)[()]
        assert exact * 0.8 <= got <= exact * 1.2, (name, got)
    assert sig(engine, "latency_mean_ms", filters=f) == {(): pytest.approx(500.5)}
    assert sig(engine, "ttft_p95_ms", filters={"model": "nostream"}) == {(): None}


def test_no_data(traffic):
    e = traffic
    nothing = {"model": "nope"}
    for name in ("requests", "errors", "rps", "total_tokens", "cost_usd", "cost_per_hour_usd"):
        assert sig(e, name, filters=nothing) == {(): 0}, name
    for name in ("error_rate", "latency_mean_ms", "latency_p95_ms", "ttft_p50_ms"):
        assert sig(e, name, filters=nothing) == {(): None}, name
    # Grouped: a series without traffic is simply absent (no data).
    assert sig(e, "error_rate", filters=nothing, group_by=("model",)) == {}
    assert sig(e, "error_rate", end_ms=NOW + DAY, group_by=("model",)) == {}


def test_feature_and_user(engine, tmp_path):
    rows = [
        trace(NOW - MIN, feature="chat", user_id="u1"),
        trace(NOW - MIN, feature="chat", user_id="u2", status="error"),
        trace(NOW - MIN, feature="chat", user_id="u1"),
        trace(NOW - MIN, feature="search", user_id="u1"),
        trace(NOW - MIN, feature="search", user_id=None),
        trace(NOW - MIN, feature=None, user_id="u2", duration_ms=400.0),
    ]
    record(engine, tmp_path / "spill", rows)
    assert by("feature", sig(engine, "requests", group_by=("feature",))) == {
        "chat": 3,
        "search": 2,
    }
    assert by("feature", sig(engine, "error_rate", group_by=("feature",))) == {
        "chat": pytest.approx(1 / 3),
        "search": 0.0,
    }
    assert sig(engine, "requests", filters={"user": "u1"}) == {(): 3}
    assert sig(engine, "latency_mean_ms", filters={"user": "u2"}) == {(): 250.0}
    assert by("user", sig(engine, "errors", group_by=("user",))) == {"u1": 0, "u2": 1}

    s = SIGNALS["requests"]
    with pytest.raises(ValueError, match=r"^group_by: 'feature' .*cannot be combined.*'model'"):
        s.check({"model": "a"}, ["feature"])
    with pytest.raises(ValueError, match=r"^filters: 'user' .*'provider'"):
        s.check({"user": "u1", "provider": "p1"}, [])
    with pytest.raises(ValueError, match="cannot be combined"):
        s.check({}, ["feature", "user"])
    with pytest.raises(ValueError, match="cannot be combined"):
        sig(engine, "requests", filters={"feature": "chat"}, group_by=("model",))
    s.check({"feature": "chat"}, ["feature"])


def test_hourly_table_for_long_windows_is_exact(engine, tmp_path):
    # Calls every 7 minutes (at varying seconds) across six hours.
    rows = [trace(NOW - 6 * HOUR + i * 7 * MIN + i * 997 % MIN) for i in range(52)]
    record(engine, tmp_path / "spill", rows)
    with engine.connect() as c:
        stamps = c.execute(sa.select(traces.c.started_at_ms)).scalars().all()
    for window in (90 * MIN, 2 * HOUR, 150 * MIN, 3 * HOUR + 17 * MIN, 5 * HOUR):
        q = SignalQuery(window, NOW)
        start, end = rollup_range(q)
        expected = sum(1 for t in stamps if start <= t < end)
        assert sig(engine, "requests", window_ms=window) == {(): expected}, window


def test_rollup_signals_share_one_query(traffic):
    e = traffic
    ctx = EvalContext(e, NOW)
    shapes: list[tuple[dict[str, str], tuple[str, ...]]] = [
        ({}, ()),
        ({}, ("model",)),
        ({}, ("provider", "endpoint")),
        ({"model": "a"}, ()),
    ]
    # 3 h: reads whole hours from rollups_hour and the edges from rollups_minute.
    for window in (W5, 3 * HOUR):
        with count_queries(e) as seen:
            for name in ROLLUP_SIGNALS:
                for filters, group_by in shapes:
                    sig(e, name, window_ms=window, filters=filters, group_by=group_by, ctx=ctx)
        assert len(seen) == 1, seen
    with count_queries(e) as seen:
        assert sig(e, "requests", group_by=("model",), ctx=ctx) != {}
        assert by("model", sig(e, "no_traffic", group_by=("model",), ctx=ctx)) == {
            "a": 0.0,
            "b": 0.0,
        }
    assert len(seen) == 1  # only the window a day earlier is new
    with count_queries(e) as seen:
        sig(e, "requests", group_by=("user",), ctx=ctx)
        sig(e, "errors", group_by=("user",), ctx=ctx)
    assert len(seen) == 1  # the per-user rollups, once
    with count_queries(e) as seen:  # a new tick reads again
        sig(e, "requests")
    assert len(seen) == 1


def test_cache_is_shared_across_threads(traffic):
    ctx = EvalContext(traffic, NOW)
    with count_queries(traffic) as seen, ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda n: sig(traffic, n, group_by=("model",), ctx=ctx), ROLLUP_SIGNALS * 4)
        )
    assert len(seen) == 1
    assert by("model", results[ROLLUP_SIGNALS.index("requests")]) == {"a": 10, "b": 4}


def test_no_traffic(engine, tmp_path):
    rows = [trace(NOW - DAY - MIN, "a"), trace(NOW - DAY - 2 * MIN, "b")]
    rows += [trace(NOW - MIN, "a"), trace(NOW - MIN, "c")]
    record(engine, tmp_path / "spill", rows)
    assert by("model", sig(engine, "no_traffic", group_by=("model",))) == {
        "a": 0.0,
        "b": 1.0,
        "c": 0.0,
    }
    assert sig(engine, "no_traffic", filters={"model": "b"}) == {(): 1.0}
    assert sig(engine, "no_traffic") == {(): 0.0}
    assert sig(engine, "no_traffic", filters={"model": "d"}) == {}
    with pytest.raises(ValueError, match="group_by: signal 'no_traffic' has no label 'feature'"):
        SIGNALS["no_traffic"].check({}, ["feature"])


# -- components ---------------------------------------------------------------------------


def check(ts: int, component: str, kind: str, up: bool, latency: float | None = None) -> dict:
    """A component_checks row as the probe daemon writes it."""
    return {
        "ts_ms": ts,
        "component": component,
        "kind": kind,
        "up": up,
        "latency_ms": latency,
        "error": None if up else "connection refused",
    }


def test_components_up_down_and_down_seconds(engine):
    rows = []
    last_up = None
    for i in range(40):  # a probe every 30 s for the last 20 minutes
        ts = NOW - 20 * MIN + i * 30_000
        db_up = ts < NOW - 3 * MIN  # the database stops answering 3 minutes ago
        last_up = ts if db_up else last_up
        rows.append(check(ts, "db", "postgres", db_up, 2.0))
        rows.append(check(ts, "api", "http", True, 10.0 + i % 2))
        if ts >= NOW - 10 * MIN:  # never worked since it was added
            rows.append(check(ts, "ghost", "http", False))
    rows.append(check(NOW - HOUR, "old", "http", True))
    with engine.begin() as c:
        c.execute(insert(component_checks), rows)
    g = ("component",)
    assert by("component", sig(engine, "component_up", group_by=g)) == {
        "db": 0.0,
        "api": 1.0,
        "ghost": 0.0,
    }
    assert by("component", sig(engine, "component_down_seconds", group_by=g)) == {
        "db": (NOW - last_up) / 1000,
        "api": 0.0,
        "ghost": 600.0,
    }
    assert (NOW - last_up) / 1000 == 210.0
    lat = by("component", sig(engine, "probe_latency_ms", group_by=g))
    assert lat["api"] == pytest.approx(10.5) and lat["db"] == 2.0 and lat["ghost"] is None
    # It keeps counting while the probes keep failing.
    later = NOW + 5 * MIN
    with engine.begin() as c:
        c.execute(
            insert(component_checks),
            [check(later - 10_000, "db", "postgres", False)],
        )
    assert sig(engine, "component_down_seconds", end_ms=later, filters={"component": "db"}) == {
        (): 510.0
    }
    # Ungrouped: down if any is down, the longest outage; filters by kind.
    assert sig(engine, "component_up") == {(): 0.0}
    assert sig(engine, "component_down_seconds") == {(): 600.0}
    assert sig(engine, "component_up", filters={"kind": "http"}, group_by=g) == {
        (("component", "api"),): 1.0,
        (("component", "ghost"),): 0.0,
    }
    # Not checked in the window: no data.
    assert sig(engine, "component_up", filters={"component": "old"}) == {}
    assert sig(engine, "component_up", window_ms=2 * HOUR, filters={"component": "old"}) == {
        (): 1.0
    }


# -- resources ----------------------------------------------------------------------------


def sample(ts: int, instance: str = "i1", **over: Any) -> dict[str, Any]:
    s = {
        "ts_ms": ts,
        "instance": instance,
        "process_cpu_percent": 10.0,
        "host_cpu_percent": 20.0,
        "process_rss_bytes": 100 * 2**20,
        "host_mem_used_bytes": 4 * 2**30,
        "host_mem_total_bytes": 16 * 2**30,
        "open_connections": 3,
        "loop_lag_ms": 1.0,
        "gpu": None,
        "recorder_queue_depth": 0,
        "recorder_spilled": 0,
        "recorder_dropped": 0,
    }
    s.update(over)
    return s


def test_recorder_counters_and_resource_means(engine):
    spilled = [0, 5, 7, 2, 4]  # the process restarted between 7 and 2
    dropped = [0, 0, 0, 0, 1]
    queue = [0, 3, 10, 1, 0]
    rows = [
        sample(
            NOW - W5 + 15_000 + i * 60_000,
            recorder_spilled=spilled[i],
            recorder_dropped=dropped[i],
            recorder_queue_depth=queue[i],
            process_cpu_percent=10.0 * (i + 1),
            host_mem_used_bytes=(4 + i) * 2**30,
            loop_lag_ms=2.0 * i,
        )
        for i in range(5)
    ]
    rows.append(sample(NOW - W5 - 1, recorder_spilled=100, process_cpu_percent=99.0))  # before
    rows += [
        sample(NOW - 60_000 * k, "i2", recorder_spilled=None, recorder_dropped=None) for k in (1, 2)
    ]
    with engine.begin() as c:
        c.execute(insert(resource_samples), rows)
    g = ("instance",)
    assert by("instance", sig(engine, "recorder_spilled", group_by=g)) == {"i1": 11.0, "i2": None}
    assert by("instance", sig(engine, "recorder_dropped", group_by=g)) == {"i1": 1.0, "i2": None}
    assert sig(engine, "recorder_spilled") == {(): 11.0}
    assert by("instance", sig(engine, "recorder_queue_depth", group_by=g)) == {"i1": 10, "i2": 0}
    cpu = by("instance", sig(engine, "process_cpu_percent", group_by=g))
    assert cpu == {"i1": pytest.approx(30.0), "i2": pytest.approx(10.0)}
    assert sig(engine, "process_cpu_percent") == {(): pytest.approx((150 + 20) / 7)}
    mem = by("instance", sig(engine, "host_mem_used_percent", group_by=g))
    assert mem == {"i1": pytest.approx(6 / 16 * 100), "i2": pytest.approx(25.0)}
    assert sig(engine, "host_cpu_percent", filters={"instance": "i2"}) == {(): 20.0}
    assert sig(engine, "process_rss_bytes", filters={"instance": "i1"}) == {(): 100 * 2**20}
    assert sig(engine, "loop_lag_ms", filters={"instance": "i1"}) == {(): pytest.approx(4.0)}
    assert sig(engine, "process_cpu_percent", end_ms=NOW + DAY) == {}


def test_gpu_signals(engine):
    g = ("instance", "gpu")
    assert sig(engine, "gpu_utilization_percent", group_by=g) == {}
    with engine.begin() as c:  # a host without a GPU stores null
        c.execute(insert(resource_samples), [sample(NOW - MIN * k) for k in (1, 2)])
    assert sig(engine, "gpu_utilization_percent", group_by=g) == {}
    assert sig(engine, "gpu_memory_used_percent") == {}

    def gpus(u0: float, u1: float) -> str:
        return orjson.dumps(
            [
                {
                    "index": 0,
                    "name": "H100",
                    "utilization_percent": u0,
                    "memory_used_bytes": 40 * 2**30,
                    "memory_total_bytes": 80 * 2**30,
                },
                {
                    "index": 1,
                    "name": "H100",
                    "utilization_percent": u1,
                    "memory_used_bytes": 20 * 2**30,
                    "memory_total_bytes": 80 * 2**30,
                },
            ]
        ).decode()

    with engine.begin() as c:
        c.execute(
            insert(resource_samples),
            [
                sample(NOW - 90_000, "gpu-host", gpu=gpus(50, 0)),
                sample(NOW - 30_000, "gpu-host", gpu=gpus(70, 10)),
            ],
        )
    util = sig(engine, "gpu_utilization_percent", group_by=g)
    assert util == {
        (("gpu", "0"), ("instance", "gpu-host")): 60.0,
        (("gpu", "1"), ("instance", "gpu-host")): 5.0,
    }
    assert by("gpu", sig(engine, "gpu_memory_used_percent", group_by=("gpu",))) == {
        "0": 50.0,
        "1": 25.0,
    }
    assert sig(engine, "gpu_utilization_percent") == {(): 32.5}


# -- retrieval ----------------------------------------------------------------------------


def span(ts_ms: int, kind: str, service: str | None, duration: float, count: int | None) -> dict:
    start_us = ts_ms * 1000
    return {
        "trace_id": new_id(),
        "span_id": new_id()[:16],
        "name": kind,
        "kind": kind,
        "service": service,
        "start_us": start_us,
        "end_us": start_us + int(duration * 1000),
        "duration_ms": duration,
        "status": "ok",
        "result_count": count,
    }


def test_retrieval_signals(engine):
    counts = [0, 3, 0, None, 5]
    rows = [span(NOW - MIN, "retrieval", "search", 10.0 * (i + 1), counts[i]) for i in range(5)]
    rows += [span(NOW - MIN, "vector-db", "qdrant", float(d), 4) for d in range(1, 101)]
    rows += [span(NOW - MIN, "llm", "app", 9000.0, 0)]  # not a retrieval
    rows += [span(NOW - W5 - 1, "retrieval", "search", 5000.0, 0)]  # before the window
    with engine.begin() as c:
        c.execute(insert(spans), rows)
    g = ("kind", "service")
    empty = sig(engine, "retrieval_empty_rate", group_by=g)
    assert empty == {
        (("kind", "retrieval"), ("service", "search")): 0.5,
        (("kind", "vector-db"), ("service", "qdrant")): 0.0,
    }
    assert sig(engine, "retrieval_empty_rate") == {(): 2 / 104}
    p95 = by("service", sig(engine, "retrieval_p95_ms", group_by=("service",)))
    assert p95 == {"search": pytest.approx(48.0), "qdrant": pytest.approx(95.05)}
    assert sig(engine, "retrieval_p95_ms", filters={"kind": "llm"}) == {}


# -- catalogue and validation -------------------------------------------------------------


def test_describe_signals():
    described = {d["name"]: d for d in describe_signals()}
    assert set(ROLLUP_SIGNALS) <= set(described)
    assert len(described) >= 33  # other modules (budgets) register more
    units = {"ratio", "ms", "count", "percent", "bytes", "usd", "seconds", "per_s", "per_min"}
    for d in described.values():
        assert d["description"] and "\n" not in d["description"]
        assert d["unit"] in units, d
    assert described["error_rate"]["labels"] == ["model", "provider", "endpoint", "feature", "user"]
    assert described["gpu_utilization_percent"]["labels"] == ["instance", "gpu"]


def rule(**over: Any) -> RuleSettings:
    spec = {"name": "r", "signal": "error_rate", "condition": {"op": "above", "threshold": 0.1}}
    return RuleSettings.model_validate({**spec, **over})


def test_validate_rule():
    validate_rule(rule(group_by=["model"], filters={"provider": "openai"}))
    validate_rule(rule(signal="component_down_seconds", filters={"component": "db"}))
    with pytest.raises(ValueError, match=r"^signal: unknown signal 'nope' \(known: .*error_rate"):
        validate_rule(rule(signal="nope"))
    with pytest.raises(ValueError, match=r"^filters: signal 'error_rate' has no label 'gpu'"):
        validate_rule(rule(filters={"gpu": "0"}))
    with pytest.raises(ValueError, match=r"^group_by: signal 'gpu_utilization_percent' .*'model'"):
        validate_rule(rule(signal="gpu_utilization_percent", group_by=["model"]))
    with pytest.raises(ValueError, match=r"^group_by: 'user' .*'model'"):
        validate_rule(rule(group_by=["user"], filters={"model": "gpt"}))
    with pytest.raises(ValueError, match=r"^group_by: label\(s\) listed twice: model"):
        validate_rule(rule(group_by=["model", "model"]))


# -- PostgreSQL ---------------------------------------------------------------------------


def test_signals_on_postgres(pg_url, tmp_path):
    e = make_engine(pg_url)
    try:
        migrate(e)
        rows = [
            trace(NOW - 4 * HOUR + i * 5 * MIN, "a", duration_ms=100.0 + i, status="ok")
            for i in range(48)
        ]
        rows += [trace(NOW - 2 * MIN + i, "b", status="error", user_id="u") for i in range(4)]
        record(e, tmp_path / "spill", rows)
        with e.begin() as c:
            c.execute(
                insert(component_checks),
                [
                    check(NOW - 100_000, "db", "postgres", True),
                    check(NOW - 40_000, "db", "postgres", False),
                ],
            )
            c.execute(insert(resource_samples), [sample(NOW - MIN), sample(NOW - 2 * MIN)])
            c.execute(insert(spans), [span(NOW - MIN, "retrieval", None, 10.0, 0)])
        ctx = EvalContext(e, NOW)
        with count_queries(e) as seen:
            for name in ROLLUP_SIGNALS:
                sig(e, name, window_ms=3 * HOUR, group_by=("model",), ctx=ctx)
        assert len(seen) == 1
        start, end = rollup_range(SignalQuery(3 * HOUR, NOW))
        in_window = sum(1 for r in rows if start <= r["started_at_ms"] < end and r["model"] == "a")
        got = sig(e, "requests", window_ms=3 * HOUR, group_by=("model",), ctx=ctx)
        assert by("model", got) == {"a": in_window, "b": 4}
        assert by("model", sig(e, "error_rate", window_ms=10 * MIN, group_by=("model",))) == {
            "a": 0.0,
            "b": 1.0,
        }
        assert sig(e, "requests", filters={"user": "u"}, ctx=ctx) == {(): 4}
        assert isinstance(sig(e, "cost_usd", ctx=ctx)[()], float)
        p50 = sig(e, "latency_p50_ms", window_ms=4 * HOUR, filters={"model": "a"}, ctx=ctx)[()]
        assert 100 <= p50 <= 150
        assert sig(e, "component_down_seconds", ctx=ctx) == {(): 100.0}
        assert sig(e, "component_up", ctx=ctx) == {(): 0.0}
        assert sig(e, "host_mem_used_percent", ctx=ctx) == {(): pytest.approx(25.0)}
        assert sig(e, "process_rss_bytes", ctx=ctx) == {(): 100 * 2**20}
        assert sig(e, "recorder_spilled", ctx=ctx) == {(): 0.0}
        assert sig(e, "retrieval_empty_rate", group_by=("service",), ctx=ctx) == {
            (("service", ""),): 1.0
        }
    finally:
        e.dispose()
