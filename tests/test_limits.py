"""Rate limits, budgets and the response cache, on real Redis and in memory.

Each test uses its own Redis key prefix (deleted afterwards), a fixed clock where
windows or periods matter, and, for outages, a private redis-server on a free
port that the test kills and restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
import redis.asyncio as aioredis
from fastapi import FastAPI
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine

from keel.alerts import budget_signal
from keel.alerts.engine import RuleEvaluator
from keel.alerts.signals import SIGNALS, EvalContext, SignalQuery
from keel.config import AlertsSettings, Settings
from keel.gateway.cache import MemoryCache, cache_key
from keel.gateway.limits import (
    BudgetExceeded,
    Limits,
    LimitsUnavailable,
    RateLimited,
    make_router,
)
from keel.store.engine import make_engine, migrate
from keel.store.recorder import Recorder
from keel.store.tables import alert_states, api_keys, rollups_dim_minute
from keel.testing.fake_upstream import _free_port

REDIS_URL = "redis://127.0.0.1:6379/0"
# Sunday 2099-11-15 10:00:10 UTC (in the future: Redis expires budget counters at the
# end of their period, by its own clock): 50 s left in the minute.
T0 = datetime(2099, 11, 15, 10, 0, 10, tzinfo=UTC).timestamp()
BACKENDS = ["memory", "redis"]


def _redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except Exception:
        return False


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def settings(backend: str = "memory", **over: Any) -> Settings:
    models = over.pop("models", {"gpt": {}})
    data: dict[str, Any] = {
        "local": {"enabled": False},
        "providers": {"p": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "models": {
            alias: {"deployments": [{"provider": "p", "model": "m"}], **spec}
            for alias, spec in models.items()
        },
        "redis_url": REDIS_URL if backend == "redis" else None,
        **over,
    }
    return Settings.model_validate(data)


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"keel-test-{uuid.uuid4().hex[:12]}:"
    yield p
    r = redis.Redis.from_url(REDIS_URL)
    with contextlib.suppress(redis.RedisError):
        keys = list(r.scan_iter(match=p + "*", count=1000))
        if keys:
            r.delete(*keys)
    r.close()


@pytest.fixture
async def make(prefix: str) -> AsyncIterator[Any]:
    made: list[Limits] = []

    async def build(backend: str, *, engine: Engine | None = None, **kw: Any) -> Limits:
        if backend == "redis" and not _redis_up():
            pytest.skip("Redis not reachable at 127.0.0.1:6379")
        kw.setdefault("clock", Clock())
        s = kw.pop("settings", None) or settings(backend, **kw.pop("over", {}))
        lim = Limits(s, engine, prefix=kw.pop("prefix", prefix), **kw)
        await lim.start()
        made.append(lim)
        return lim

    yield build
    for lim in made:
        await lim.aclose()


async def flush_prefix(prefix: str) -> None:
    r = aioredis.from_url(REDIS_URL)
    keys = [k async for k in r.scan_iter(match=prefix + "*", count=1000)]
    if keys:
        await r.delete(*keys)
    await r.aclose()


def admit(lim: Limits, **kw: Any) -> Any:
    args: dict[str, Any] = dict(
        key_id=None,
        key_rpm=None,
        key_tpm=None,
        key_budget=None,
        alias="gpt",
        user=None,
        feature=None,
    )
    args.update(kw)
    return lim.admit(**args)


async def count_admitted(lim: Limits, n: int, **kw: Any) -> int:
    ok = 0
    for _ in range(n):
        try:
            await admit(lim, **kw)
            ok += 1
        except (RateLimited, BudgetExceeded):
            pass
    return ok


# -- rate limits ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_rpm_exact_boundary_and_refusals_cost_nothing(backend: str, make: Any) -> None:
    clock = Clock()
    lim = await make(backend, clock=clock, over={"models": {"gpt": {"rpm": 7}}})
    for _ in range(5):
        await admit(lim, key_id="a", key_rpm=5)
    with pytest.raises(RateLimited) as e:
        await admit(lim, key_id="a", key_rpm=5)
    assert e.value.status == 429 and e.value.retry_after_s == 50
    assert e.value.to_body()["error"]["retry_after_s"] == 50
    assert "key 'a'" in e.value.message and "5 requests per minute" in e.value.message
    # Refused calls counted neither on the key nor on the model: 2 left of the model's 7.
    for _ in range(3):
        with pytest.raises(RateLimited):
            await admit(lim, key_id="a", key_rpm=5)
    assert await count_admitted(lim, 5, key_id="b", key_rpm=5) == 2
    with pytest.raises(RateLimited) as e:
        await admit(lim, key_id="c", key_rpm=5)
    assert "model 'gpt'" in e.value.message
    clock.t += 50  # the next window
    assert await count_admitted(lim, 6, key_id="a", key_rpm=5) == 5


@pytest.mark.parametrize("backend", BACKENDS)
async def test_concurrent_burst_admits_exactly_the_limit(backend: str, make: Any) -> None:
    lim = await make(backend)
    res = await asyncio.gather(
        *(admit(lim, key_id="k", key_rpm=30) for _ in range(100)), return_exceptions=True
    )
    assert sum(not isinstance(r, Exception) for r in res) == 30
    assert all(isinstance(r, RateLimited) for r in res if isinstance(r, Exception))


async def test_two_replicas_share_redis_counters(make: Any) -> None:
    clock = Clock()
    a = await make("redis", clock=clock, over={"models": {"gpt": {"rpm": 30}}})
    b = await make("redis", clock=clock, over={"models": {"gpt": {"rpm": 30}}})
    res = await asyncio.gather(
        *(admit(a if i % 2 else b) for i in range(100)), return_exceptions=True
    )
    assert sum(not isinstance(r, Exception) for r in res) == 30


@pytest.mark.parametrize("backend", BACKENDS)
async def test_tpm_is_enforced_on_the_next_request(backend: str, make: Any) -> None:
    clock = Clock()
    lim = await make(backend, clock=clock, over={"models": {"gpt": {"tpm": 1000}}})
    kw = dict(key_id="k", key_tpm=100)
    adm = await admit(lim, **kw)
    lim.settle(adm, tokens=60, cost_usd=None)
    await lim.drain()
    adm = await admit(lim, **kw)  # 60 < 100
    lim.settle(adm, tokens=40, cost_usd=None)
    await lim.drain()
    with pytest.raises(RateLimited) as e:  # 100 >= 100
        await admit(lim, **kw)
    assert "100 of 100 tokens per minute" in e.value.message and e.value.retry_after_s == 50
    await admit(lim, key_id="other", key_tpm=100)  # the model's 1000 are not used up
    adm = await admit(lim, key_id="big", key_tpm=10_000)
    lim.settle(adm, tokens=900, cost_usd=None)
    await lim.drain()
    with pytest.raises(RateLimited) as e:
        await admit(lim, key_id="other2")
    assert "model 'gpt'" in e.value.message
    clock.t += 60
    await admit(lim, **kw)


# -- budgets ----------------------------------------------------------------------------------


def budget(name: str, scope: str, limit: float, **kw: Any) -> dict[str, Any]:
    return {"name": name, "scope": scope, "limit_usd": limit, **kw}


async def spend(lim: Limits, usd: float, **kw: Any) -> None:
    adm = await admit(lim, **kw)
    lim.settle(adm, tokens=0, cost_usd=usd)
    await lim.drain()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_hard_budget_exact_boundary(backend: str, make: Any) -> None:
    lim = await make(backend, over={"budgets": [budget("org", "global", 1.0, period="day")]})
    for _ in range(10):  # 10 x $0.10 is exactly $1.00: counters are integer nano-dollars
        await spend(lim, 0.1)
    with pytest.raises(BudgetExceeded) as e:
        await admit(lim)
    err = e.value
    assert err.status == 429 and err.type == "insufficient_quota"
    assert err.message == (
        "the gateway has spent $1.00 of its $1.00 daily budget 'org'; it resets 2099-11-16T00:00Z"
    )
    body = err.to_body()["error"]
    assert body["code"] == "insufficient_quota" and body["budget"] == "org"
    assert body["spent_usd"] == 1.0 and body["limit_usd"] == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
async def test_just_under_the_limit_is_admitted(backend: str, make: Any) -> None:
    lim = await make(backend, over={"budgets": [budget("org", "global", 1.0)]})
    await spend(lim, 0.999999999)
    await admit(lim)
    await spend(lim, 0.000000001)
    with pytest.raises(BudgetExceeded):
        await admit(lim)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_soft_budget_never_refuses(backend: str, make: Any) -> None:
    lim = await make(backend, over={"budgets": [budget("soft", "global", 0.5, mode="soft")]})
    for _ in range(3):
        await spend(lim, 0.5)
    await admit(lim)
    [st] = await lim.budget_status()
    assert st["spent_usd"] == 1.5 and st["ratio"] == 3.0 and st["mode"] == "soft"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_budgets_per_key_user_feature(backend: str, make: Any) -> None:
    lim = await make(
        backend,
        over={
            "budgets": [
                budget("per-key", "key", 1.0, match="*"),
                budget("alice", "user", 0.5, match="alice", period="week"),
                budget("per-feature", "feature", 2.0),
            ]
        },
    )
    await spend(lim, 1.0, key_id="k1", key_name="ci-bot")
    with pytest.raises(BudgetExceeded) as e:
        await admit(lim, key_id="k1", key_name="ci-bot")
    assert e.value.message.startswith(
        "key 'ci-bot' has spent $1.00 of its $1.00 monthly budget 'per-key'"
    )
    await admit(lim, key_id="k2")  # '*': each key separately
    await spend(lim, 0.5, user="alice")
    with pytest.raises(BudgetExceeded) as e:
        await admit(lim, user="alice")
    assert "user 'alice'" in e.value.message and "resets 2099-11-16T00:00Z" in e.value.message
    await spend(lim, 5.0, user="bob")  # no budget matches bob
    await admit(lim, user="bob")
    await spend(lim, 2.0, feature="search")
    with pytest.raises(BudgetExceeded):
        await admit(lim, feature="search")
    await admit(lim, feature="chat")
    await admit(lim)  # no key, user or feature: only budgets that apply


@pytest.mark.parametrize("backend", BACKENDS)
async def test_key_own_budget_and_config_budget_by_key_name(backend: str, make: Any) -> None:
    lim = await make(backend, over={"budgets": [budget("bot", "key", 50.0, match="ci-bot")]})
    own = (50.0, "month")
    await spend(lim, 49.99, key_id="k1", key_name="ci-bot", key_budget=own)
    await admit(lim, key_id="k1", key_name="ci-bot", key_budget=own)
    await spend(lim, 0.01, key_id="k1", key_name="ci-bot", key_budget=own)
    with pytest.raises(BudgetExceeded) as e:
        await admit(lim, key_id="k1", key_name="ci-bot", key_budget=own)
    # The key's own budget is checked first.
    assert e.value.message == (
        "key 'ci-bot' has spent $50.00 of its $50.00 monthly budget; it resets 2099-12-01T00:00Z"
    )
    assert e.value.retry_after_s == int(datetime(2099, 12, 1, tzinfo=UTC).timestamp() - T0)
    # Without its own budget the config budget matching the name refuses too.
    with pytest.raises(BudgetExceeded) as e:
        await admit(lim, key_id="k1", key_name="ci-bot")
    assert "budget 'bot'" in e.value.message


@pytest.mark.parametrize("backend", BACKENDS)
async def test_budget_period_resets(backend: str, make: Any) -> None:
    clock = Clock()
    lim = await make(
        backend, clock=clock, over={"budgets": [budget("d", "global", 1.0, period="day")]}
    )
    await spend(lim, 1.0)
    with pytest.raises(BudgetExceeded):
        await admit(lim)
    clock.t = datetime(2099, 11, 16, 0, 0, 1, tzinfo=UTC).timestamp()
    await admit(lim)


# -- seeding budgets from the store -----------------------------------------------------------


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'keel.db'}")
    migrate(eng)
    yield eng
    eng.dispose()


def record_spend(engine: Engine, tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    rec = Recorder(engine, tmp_path / "spill", flush_interval_s=0.01)
    rec.start()
    for i, r in enumerate(rows):
        rec.record(
            {
                "id": uuid.uuid4().hex,
                "started_at_ms": int(T0 * 1000) - 3_600_000 - i,
                "duration_ms": 10.0,
                "endpoint": "chat",
                "model": "gpt",
                "provider": "p",
                "status": "ok",
                "http_status": 200,
                "stream": False,
                "tokens_estimated": False,
                **r,
            }
        )
    assert rec.flush(10)
    rec.stop()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_budget_spend_is_seeded_from_the_store(
    backend: str, make: Any, engine: Engine, tmp_path: Path, prefix: str
) -> None:
    record_spend(
        engine,
        tmp_path,
        [
            {"user_id": "alice", "cost_usd": 0.75},
            {"user_id": "alice", "feature": "search", "cost_usd": 0.25},
            {"user_id": "bob", "cost_usd": 0.5},
        ],
    )
    with engine.begin() as conn:  # the recorder's 'key' dimension, written directly
        conn.execute(
            insert(rollups_dim_minute),
            [
                {
                    "minute_ms": int(T0 // 60 * 60_000),
                    "dimension": "key",
                    "value": "k1",
                    "status": "ok",
                    "cost_usd": 5.0,
                }
            ],
        )
    budgets = [
        budget("per-user", "user", 1.0),
        budget("org", "global", 1.6),
        budget("per-key", "key", 5.0),
    ]
    lim = await make(backend, engine=engine, over={"budgets": budgets})
    with pytest.raises(BudgetExceeded) as e:
        await admit(lim, user="alice")
    assert "$1.00 of its $1.00" in e.value.message
    await admit(lim, user="bob")  # 0.5 of 1.0
    with pytest.raises(BudgetExceeded):
        await admit(lim, key_id="k1")
    await spend(lim, 0.1, user="bob")  # global: 1.5 + 0.1 = 1.6
    with pytest.raises(BudgetExceeded) as e:
        await admit(lim, user="carol")
    assert "budget 'org'" in e.value.message
    if backend == "redis":
        await flush_prefix(prefix)  # a Redis restart: counters are seeded again from the store
        with pytest.raises(BudgetExceeded):
            await admit(lim, user="alice")
        await admit(lim, user="carol")  # the $0.10 settled after the store was read is gone
    # A new process (or new counters) seeds too, once for a burst of first requests.
    fresh = await make(backend, engine=engine, over={"budgets": budgets}, prefix=prefix + "x:")
    res = await asyncio.gather(
        *(admit(fresh, user=u) for u in ["alice"] * 20 + ["dave"]), return_exceptions=True
    )
    assert all(isinstance(r, BudgetExceeded) for r in res[:20]) and res[-1] is not None
    assert not isinstance(res[-1], Exception)


# -- Redis outages ----------------------------------------------------------------------------


class RedisProcess:
    """A private redis-server on a free port, without persistence."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        r = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        r.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def private_redis() -> Iterator[RedisProcess]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    rp = RedisProcess()
    rp.start()
    yield rp
    rp.kill()


async def test_redis_down_fail_open(
    private_redis: RedisProcess, make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    s = settings("redis", redis_url=private_redis.url)
    lim = await make("redis", settings=s, cooldown_s=0.2)
    kw = dict(key_id="k", key_rpm=3)
    assert await count_admitted(lim, 4, **kw) == 3
    assert lim.status() == {
        "backend": "redis",
        "redis_ok": True,
        "mode": "open",
        "last_error": None,
        "down_since": None,
    }
    private_redis.kill()
    caplog.set_level(logging.WARNING, "keel.gateway.limits")
    # Per-process limits from now on: a fresh window of 3.
    assert await count_admitted(lim, 5, **kw) == 3
    st = lim.status()
    assert st["backend"] == "memory" and st["redis_ok"] is False and st["last_error"]
    lim.settle(await admit(lim, key_id="other"), tokens=5, cost_usd=0.1)  # never raises
    await lim.drain()
    key = cache_key("gpt", {"messages": []})
    lim.cache.put(key, b"x", 10)
    await lim.drain()
    assert await lim.cache.get(key) == b"x"  # the in-process cache stands in
    await asyncio.sleep(0.25)
    assert await count_admitted(lim, 2, **kw) == 0  # probes Redis (still down), stays memory
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1, "one warning per outage, not per request"
    private_redis.start()  # back, empty
    await asyncio.sleep(0.25)
    assert await count_admitted(lim, 4, **kw) == 3  # on Redis again
    assert lim.status()["redis_ok"] is True and lim.status()["backend"] == "redis"
    assert any("answers again" in r.getMessage() for r in caplog.records)


async def test_redis_down_fail_closed(private_redis: RedisProcess, make: Any) -> None:
    s = settings("redis", redis_url=private_redis.url, limits={"redis_failure": "closed"})
    lim = await make("redis", settings=s, cooldown_s=0.2)
    kw = dict(key_id="k", key_rpm=100)
    await admit(lim, **kw)
    private_redis.kill()
    with pytest.raises(LimitsUnavailable) as e:
        await admit(lim, **kw)
    assert e.value.status == 503 and "redis_failure" in e.value.message
    with pytest.raises(LimitsUnavailable):  # during the cool-down: refused at once
        await admit(lim, **kw)
    assert lim.status()["redis_ok"] is False and lim.status()["mode"] == "closed"
    assert not lim.ready
    assert await lim.cache.get("gpt:x") is None  # the cache never refuses
    await admit(lim)  # nothing to check for this call: admitted
    private_redis.start()
    await asyncio.sleep(0.25)
    await admit(lim, **kw)
    assert lim.status()["redis_ok"] is True and lim.ready


async def test_redis_unreachable_at_start_is_an_outage(make: Any) -> None:
    s = settings("redis", redis_url=f"redis://127.0.0.1:{_free_port()}/0")
    lim = await make("redis", settings=s)
    assert lim.status()["redis_ok"] is False
    await admit(lim)  # fail-open: serving from memory


# -- the response cache -----------------------------------------------------------------------


def test_cache_key_is_canonical() -> None:
    body = {
        "model": "gpt",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0,
        "response_format": {"type": "text", "a": 1},
    }
    same = {
        "response_format": {"a": 1, "type": "text"},
        "temperature": 0,
        "messages": [{"content": "hi", "role": "user"}],
        "model": "gpt",
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "alice",
        "metadata": {"feature": "x"},
    }
    assert cache_key("gpt", body) == cache_key("gpt", same)
    assert cache_key("gpt", body).startswith("gpt:")
    assert cache_key("gpt", body) != cache_key("other", body)
    assert cache_key("gpt", body) != cache_key("gpt", {**body, "temperature": 1})
    assert cache_key("gpt", body) != cache_key("gpt", {**body, "messages": []})


@pytest.mark.parametrize("backend", BACKENDS)
async def test_cache_hit_miss_and_expiry(backend: str, make: Any) -> None:
    lim = await make(backend, clock=time.time)
    k = cache_key("gpt", {"messages": [{"role": "user", "content": uuid.uuid4().hex}]})
    assert await lim.cache.get(k) is None
    lim.cache.put(k, b'{"id":"1"}', 0.3)
    await lim.drain()
    assert await lim.cache.get(k) == b'{"id":"1"}'
    await asyncio.sleep(0.4)
    assert await lim.cache.get(k) is None


def test_memory_cache_is_bounded() -> None:
    c = MemoryCache(max_entries=3, max_bytes=100)
    for i in range(4):
        c.set(f"k{i}", b"x", 60)
    assert c.get("k0") is None and len(c) == 3
    c.get("k1")  # recently used: kept
    c.set("k4", b"x", 60)
    assert c.get("k1") == b"x" and c.get("k2") is None
    c.set("big1", b"y" * 45, 60)
    c.set("big2", b"y" * 45, 60)
    assert c.bytes <= 100 and c.get("big2") is not None
    c.set("huge", b"z" * 101, 60)  # larger than the whole cache: not stored
    assert c.get("huge") is None


# -- budget status, the API and the alert signal ----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_budget_status_and_api(backend: str, make: Any) -> None:
    lim = await make(
        backend,
        over={
            "budgets": [
                budget("org", "global", 10.0, period="day", mode="soft"),
                budget("per-user", "user", 2.0, period="week"),
                budget("alice", "user", 1.0, match="alice"),
            ]
        },
    )
    await spend(lim, 0.5, user="alice")
    await spend(lim, 1.5, user="bob")
    rows = await lim.budget_status()
    by = {(r["name"], r["value"]): r for r in rows}
    assert set(by) == {("org", ""), ("per-user", "alice"), ("per-user", "bob"), ("alice", "alice")}
    assert by[("org", "")]["spent_usd"] == 2.0 and by[("org", "")]["ratio"] == 0.2
    assert by[("org", "")]["period_end"] == "2099-11-16T00:00Z"
    assert by[("per-user", "bob")]["ratio"] == 0.75
    assert by[("per-user", "bob")]["period_end"] == "2099-11-16T00:00Z"  # Monday
    assert by[("alice", "alice")] == {
        "name": "alice",
        "scope": "user",
        "value": "alice",
        "spent_usd": 0.5,
        "limit_usd": 1.0,
        "period": "month",
        "period_end": "2099-12-01T00:00Z",
        "ratio": 0.5,
        "mode": "hard",
    }
    app = FastAPI()
    app.include_router(make_router(lim))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        resp = await client.get("/api/budgets")
    assert resp.status_code == 200
    assert len(resp.json()["data"]) == 4
    assert await lim.key_spend("nobody", "month") == 0.0


def test_budget_used_percent_signal(engine: Engine, tmp_path: Path) -> None:
    record_spend(
        engine,
        tmp_path,
        [
            {"user_id": "alice", "cost_usd": 0.9},
            {"user_id": "bob", "cost_usd": 0.2},
            {"feature": "search", "cost_usd": 0.5},
        ],
    )
    with engine.begin() as conn:
        conn.execute(
            insert(api_keys),
            [
                {
                    "id": "k1",
                    "name": "ci-bot",
                    "prefix": "sk-keel-ab",
                    "hash": "h1",
                    "role": "user",
                    "budget_usd": 2.0,
                    "budget_period": "day",
                    "created_at_ms": 0,
                }
            ],
        )
        conn.execute(
            insert(rollups_dim_minute),
            [
                {
                    "minute_ms": int(T0 // 60 * 60_000),
                    "dimension": "key",
                    "value": "k1",
                    "status": "ok",
                    "cost_usd": 1.0,
                }
            ],
        )
    b = Settings.model_validate(
        {
            "local": {"enabled": False},
            "budgets": [
                budget("per-user", "user", 1.0, mode="soft"),
                budget("org", "global", 4.0),
                budget("bot", "key", 4.0, match="ci-bot"),
            ],
        }
    ).budgets
    budget_signal.configure(b)
    try:
        sig = SIGNALS["budget_used_percent"]
        ctx = EvalContext(engine, int(T0 * 1000))
        vals = sig.values(ctx, SignalQuery(300_000, int(T0 * 1000)))
        assert vals == {
            (("budget", "per-user"), ("scope", "user"), ("value", "alice")): pytest.approx(90.0),
            (("budget", "per-user"), ("scope", "user"), ("value", "bob")): pytest.approx(20.0),
            (("budget", "org"), ("scope", "global"), ("value", "")): pytest.approx(40.0),
            (("budget", "bot"), ("scope", "key"), ("value", "ci-bot")): pytest.approx(25.0),
            (("budget", "key ci-bot"), ("scope", "key"), ("value", "k1")): pytest.approx(50.0),
        }
        only = sig.values(ctx, SignalQuery(300_000, int(T0 * 1000), (("scope", "user"),)))
        assert len(only) == 2
        grouped = sig.values(ctx, SignalQuery(300_000, int(T0 * 1000), (), ("scope",)))
        assert grouped[(("scope", "user"),)] == pytest.approx(90.0)
        sig.check({"budget": "x"}, ["value"])
        with pytest.raises(ValueError):
            sig.check({"model": "x"}, [])
        # An ordinary rule fires for the one budget above 80 %, naming it.
        alerts = AlertsSettings.model_validate(
            {
                "rules": [
                    {
                        "name": "budget-80",
                        "signal": "budget_used_percent",
                        "condition": {"op": "above", "threshold": 80},
                    }
                ]
            }
        )
        RuleEvaluator(engine, alerts, "http://keel").evaluate(int(T0 * 1000))
        with engine.connect() as conn:
            firing = conn.execute(
                select(alert_states.c.labels).where(alert_states.c.state == "firing")
            ).all()
        assert [orjson.loads(r.labels) for r in firing] == [
            {"budget": "per-user", "scope": "user", "value": "alice"}
        ]
    finally:
        budget_signal.configure([])
