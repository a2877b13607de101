"""Rate limits and budgets, shared by every replica through Redis (in-process without it).

Admission costs at most one Redis round trip: a single Lua script checks every
counter that applies to a request (key RPM, model RPM, key TPM, model TPM, each
hard budget) and, only when all pass, counts the request. A refused request
consumes nothing. Settlement (tokens and spend, known only after the call) is a
second script run from a background task, so it never delays the response.

Windows are fixed 60-second windows aligned on the UTC minute (``epoch // 60``):
exact counts, a retry-after that is simply "until the next minute", and the same
answer on every replica (clocks are NTP-synchronised; the window number comes
from the caller's clock so the in-memory backend behaves identically). The cost
is the usual fixed-window burst: up to twice the limit across a minute boundary.
TPM is enforced on the next request: a call is refused once the tokens already
used in the current minute (counted in the minute a call ends) reached the limit.
Hard budgets likewise see spend once calls end: calls already in flight when a
budget runs out still finish, so a burst can overshoot by what it was spending.

Spend is counted in integer nano-dollars (exact sums, so "spent == limit" is an
exact boundary) per (scope, value, period), in counters named by the period's
start and expiring after it. Every budget on the same scope and period shares
one counter. A counter missing from Redis (first use, or a Redis restart) is
seeded from the store's rollups with ``SET NX`` — once per scope and period, for
all values at once, remembered by a marker key — before a hard budget is
checked. Without Redis the same code runs on dicts, seeded the same way at
start-up, so budgets also survive a process restart.

When Redis fails, ``limits.redis_failure`` decides: ``open`` switches to a fresh
in-process backend for a cool-down and then retries Redis (one warning per
outage, reported by :meth:`Limits.status`); ``closed`` refuses calls with 503.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from fastapi import APIRouter
from pydantic import BaseModel
from redis.exceptions import RedisError
from sqlalchemy import Float, cast, func, select
from sqlalchemy.engine import Engine

from keel.config import BudgetSettings, Settings
from keel.errors import KeelError
from keel.gateway.cache import MemoryCache, ResponseCache
from keel.store.tables import rollups_dim_minute, rollups_hour

log = logging.getLogger("keel.gateway.limits")
_T = TypeVar("_T")

WINDOW_S = 60
RATE_TTL_S = 2 * WINDOW_S
NANO = 1_000_000_000
#: Kept after a period ends, so a request racing the reset still finds its counter.
PERIOD_SLACK_S = 3600
SEED_BACKOFF_S = 30.0
_DIMENSION = {"key": "key", "user": "user", "feature": "feature"}
_PERIODLY = {"day": "daily", "week": "weekly", "month": "monthly"}


class RateLimited(KeelError):
    """Too many requests or tokens this minute; ``retry_after_s`` until the window resets."""

    status = 429
    type = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(
            message, code="rate_limit_exceeded", extra={"retry_after_s": retry_after_s}
        )
        self.retry_after_s = retry_after_s


class BudgetExceeded(KeelError):
    """A hard budget is spent (OpenAI's ``insufficient_quota``)."""

    status = 429
    type = "insufficient_quota"

    def __init__(
        self,
        message: str,
        *,
        budget: str,
        spent_usd: float,
        limit_usd: float,
        resets_at: str,
        retry_after_s: int,
    ) -> None:
        super().__init__(
            message,
            code="insufficient_quota",
            extra={
                "budget": budget,
                "spent_usd": spent_usd,
                "limit_usd": limit_usd,
                "resets_at": resets_at,
            },
        )
        self.budget = budget
        self.spent_usd = spent_usd
        self.limit_usd = limit_usd
        self.resets_at = resets_at
        self.retry_after_s = retry_after_s


class LimitsUnavailable(KeelError):
    """Redis is unreachable and ``limits.redis_failure`` is ``closed``."""

    status = 503
    type = "limits_unavailable"


# -- periods and the store ------------------------------------------------------------------


def period_bounds(period: str, now_s: float) -> tuple[datetime, datetime]:
    """The UTC period (day, ISO week from Monday, calendar month) holding ``now_s``."""
    now = datetime.fromtimestamp(now_s, UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day, day + timedelta(days=1)
    if period == "week":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    start = day.replace(day=1)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


def _ms(d: datetime) -> int:
    return int(d.timestamp() * 1000)


def _iso(d: datetime) -> str:
    return d.strftime("%Y-%m-%dT%H:%MZ")


def spend_from_store(engine: Engine, scope: str, start_ms: int, end_ms: int) -> dict[str, float]:
    """USD spent per value of a scope between two instants, from the rollups
    (global: ``rollups_hour``; key/user/feature: ``rollups_dim_minute``). Blocking."""
    if scope == "global":
        t = rollups_hour
        stmt: Any = select(cast(func.sum(t.c.cost_usd), Float)).where(
            t.c.minute_ms >= start_ms, t.c.minute_ms < end_ms
        )
        with engine.connect() as conn:
            return {"": float(conn.execute(stmt).scalar() or 0.0)}
    t = rollups_dim_minute
    stmt = (
        select(t.c.value, cast(func.sum(t.c.cost_usd), Float))
        .where(
            t.c.dimension == _DIMENSION[scope], t.c.minute_ms >= start_ms, t.c.minute_ms < end_ms
        )
        .group_by(t.c.value)
    )
    with engine.connect() as conn:
        return {v: float(s or 0.0) for v, s in conn.execute(stmt) if v}


@dataclass(frozen=True, slots=True)
class _Period:
    """One scope's counters for one period."""

    scope: str
    period: str
    start: datetime
    end: datetime
    base: str  # f"{prefix}sp:{scope}:{period}:{start date}"

    @property
    def marker(self) -> str:
        return self.base + "#seeded"

    @property
    def index(self) -> str:
        return self.base + "#values"

    def counter(self, value: str) -> str:
        return f"{self.base}:{value}"

    @property
    def expire_at(self) -> int:
        return int(self.end.timestamp()) + PERIOD_SLACK_S


# -- backends -------------------------------------------------------------------------------

# A check is (kind, counter key, limit, marker key or None); kind r: requests (refuse when
# count + 1 > limit, count it when admitted), t: tokens, b: budget nano-USD (refuse when
# used >= limit). Result: (0,) admitted, (1, index, used) refused, (2, [indexes]) budget
# counters that must be seeded first.
Check = tuple[str, str, int, str | None]
# A spend item is (counter, marker, index set, value, expire_at).
SpendItem = tuple[str, str, str, str, int]

_ADMIT_LUA = """
local n, assume = (#ARGV - 2) / 2, ARGV[2] == '1'
local vals, missing, m = {}, {2}, n
for i = 1, n do
  local raw = redis.call('GET', KEYS[i])
  if ARGV[1 + 2 * i] == 'b' then
    m = m + 1
    if not raw and not assume and redis.call('EXISTS', KEYS[m]) == 0 then
      missing[#missing + 1] = i
    end
  end
  vals[i] = raw or '0'
end
if #missing > 1 then return missing end
for i = 1, n do
  local kind, limit, v = ARGV[1 + 2 * i], tonumber(ARGV[2 + 2 * i]), tonumber(vals[i])
  if (kind == 'r' and v + 1 > limit) or (kind ~= 'r' and v >= limit) then
    return {1, i, vals[i]}
  end
end
for i = 1, n do
  if ARGV[1 + 2 * i] == 'r' and redis.call('INCR', KEYS[i]) == 1 then
    redis.call('EXPIRE', KEYS[i], ARGV[1])
  end
end
return {0}
"""

_SETTLE_LUA = """
local nt, tokens, ttl, amount = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
for i = 1, nt do
  if redis.call('INCRBY', KEYS[i], tokens) == tonumber(tokens) then
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
local missing = {}
for j = 0, (#KEYS - nt) / 3 - 1 do
  local c, m, x = KEYS[nt + 3 * j + 1], KEYS[nt + 3 * j + 2], KEYS[nt + 3 * j + 3]
  if redis.call('EXISTS', c) == 1 or redis.call('EXISTS', m) == 1 then
    local exp = ARGV[5 + 2 * j]
    redis.call('INCRBY', c, amount)
    redis.call('EXPIREAT', c, exp)
    redis.call('SADD', x, ARGV[6 + 2 * j])
    redis.call('EXPIREAT', x, exp)
  else
    missing[#missing + 1] = j
  end
end
return missing
"""


class MemoryBackend:
    """The same semantics on dicts, for one process (atomic: no await inside)."""

    name = "memory"

    def __init__(self, clock: Callable[[], float], cache: MemoryCache) -> None:
        self._clock = clock
        self._n: dict[str, int] = {}
        self._sets: dict[str, set[str]] = {}
        self._exp: dict[str, float] = {}
        self._sweep_at = 0.0
        self.cache = cache

    def _get(self, key: str, now: float) -> int | None:
        exp = self._exp.get(key)
        if exp is not None and exp <= now:
            self._delete(key)
            return None
        return self._n.get(key)

    def _delete(self, key: str) -> None:
        self._n.pop(key, None)
        self._sets.pop(key, None)
        self._exp.pop(key, None)

    def _sweep(self, now: float) -> None:
        if now < self._sweep_at:
            return
        self._sweep_at = now + WINDOW_S
        for k in [k for k, e in self._exp.items() if e <= now]:
            self._delete(k)

    async def admit(self, checks: list[Check], assume_zero: bool) -> tuple[Any, ...]:
        now = self._clock()
        self._sweep(now)
        if not assume_zero:
            missing = [
                i
                for i, (kind, key, _, marker) in enumerate(checks)
                if kind == "b"
                and self._get(key, now) is None
                and self._get(marker or "", now) is None
            ]
            if missing:
                return (2, missing)
        for i, (kind, key, limit, _) in enumerate(checks):
            v = self._get(key, now) or 0
            if (v + 1 > limit) if kind == "r" else (v >= limit):
                return (1, i, v)
        for kind, key, _, _ in checks:
            if kind == "r":
                if self._get(key, now) is None:
                    self._exp[key] = now + RATE_TTL_S
                self._n[key] = self._n.get(key, 0) + 1
        return (0,)

    async def settle(
        self, tpm_keys: list[str], tokens: int, items: list[SpendItem], nano: int
    ) -> list[int]:
        now = self._clock()
        for key in tpm_keys:
            if self._get(key, now) is None:
                self._exp[key] = now + RATE_TTL_S
            self._n[key] = self._n.get(key, 0) + tokens
        missing = []
        for j, (counter, marker, index, value, expire_at) in enumerate(items):
            if self._get(counter, now) is None and self._get(marker, now) is None:
                missing.append(j)
                continue
            self._n[counter] = self._n.get(counter, 0) + nano
            self._exp[counter] = expire_at
            self._sets.setdefault(index, set()).add(value)
            self._exp[index] = expire_at
        return missing

    async def seed(
        self, marker: str, index: str, counters: dict[str, tuple[str, int]], expire_at: int
    ) -> None:
        now = self._clock()
        for key, (value, nano) in counters.items():
            if self._get(key, now) is None:
                self._n[key] = nano
                self._exp[key] = expire_at
            self._sets.setdefault(index, set()).add(value)
            self._exp[index] = expire_at
        self._n[marker] = 1
        self._exp[marker] = expire_at

    async def read_spend(self, p: _Period) -> dict[str, int] | None:
        """Nano-USD per value of a period, or None when it was never seeded."""
        now = self._clock()
        if self._get(p.marker, now) is None:
            return None
        self._get(p.index, now)
        return {v: self._get(p.counter(v), now) or 0 for v in self._sets.get(p.index, ())}

    async def cache_get(self, key: str) -> bytes | None:
        return self.cache.get(key)

    async def cache_set(self, key: str, value: bytes, ttl_s: float) -> None:
        self.cache.set(key, value, ttl_s)

    async def ping(self) -> None:
        return None


class RedisBackend:
    """Counters in Redis, changed only by the two Lua scripts (atomic, one round trip)."""

    name = "redis"

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._admit = client.register_script(_ADMIT_LUA)
        self._settle = client.register_script(_SETTLE_LUA)

    async def admit(self, checks: list[Check], assume_zero: bool) -> tuple[Any, ...]:
        keys = [c[1] for c in checks]
        keys += [c[3] for c in checks if c[0] == "b"]
        args: list[Any] = [RATE_TTL_S, "1" if assume_zero else "0"]
        for kind, _, limit, _ in checks:
            args += (kind, limit)
        res = await self._admit(keys, args)
        code = int(res[0])
        if code == 0:
            return (0,)
        if code == 1:
            return (1, int(res[1]) - 1, int(res[2]))
        return (2, [int(i) - 1 for i in res[1:]])

    async def settle(
        self, tpm_keys: list[str], tokens: int, items: list[SpendItem], nano: int
    ) -> list[int]:
        keys = list(tpm_keys)
        args: list[Any] = [len(tpm_keys), tokens, RATE_TTL_S, nano]
        for counter, marker, index, value, expire_at in items:
            keys += (counter, marker, index)
            args += (expire_at, value)
        return [int(j) for j in await self._settle(keys, args)]

    async def seed(
        self, marker: str, index: str, counters: dict[str, tuple[str, int]], expire_at: int
    ) -> None:
        async with self.client.pipeline(transaction=False) as p:
            for key, (_, nano) in counters.items():
                p.set(key, nano, nx=True, exat=expire_at)
            if counters:
                p.sadd(index, *(v for v, _ in counters.values()))
                p.expireat(index, expire_at)
            p.set(marker, 1, exat=expire_at)
            await p.execute()

    async def read_spend(self, p: _Period) -> dict[str, int] | None:
        if not await self.client.exists(p.marker):
            return None
        values = sorted(v.decode() for v in await self.client.smembers(p.index))
        if not values:
            return {}
        counts = await self.client.mget([p.counter(v) for v in values])
        return {v: int(c or 0) for v, c in zip(values, counts, strict=True)}

    async def cache_get(self, key: str) -> bytes | None:
        return await self.client.get(self.prefix + "c:" + key)

    async def cache_set(self, key: str, value: bytes, ttl_s: float) -> None:
        await self.client.set(self.prefix + "c:" + key, value, px=max(1, int(ttl_s * 1000)))

    async def ping(self) -> None:
        await self.client.ping()


Backend = MemoryBackend | RedisBackend


# -- the policy -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _BudgetRef:
    name: str  # shown in messages and errors
    scope: str
    value: str
    period: str
    limit_usd: float
    own_key: bool = False
    label: str = ""  # who, in messages: the key's name rather than its id


@dataclass(slots=True)
class Admission:
    """What :meth:`Limits.settle` needs to count a call admitted by :meth:`Limits.admit`."""

    alias: str
    key_id: str | None = None
    tpm_ids: tuple[str, ...] = ()
    #: (scope, value, period) of every spend counter the call adds to, soft budgets too
    spend: tuple[tuple[str, str, str], ...] = ()
    #: names of the budgets that apply
    budgets: tuple[str, ...] = ()


def _usd(x: float) -> str:
    return f"${x:.2f}" if x == 0 or abs(x) >= 0.01 else f"${x:.4g}"


def _redis_where(url: str) -> str:
    # Never log credentials: keep host, port and db.
    rest = url.split("://", 1)[-1]
    return rest.rsplit("@", 1)[-1]


class Limits:
    """Rate limits, budgets and the response cache of one gateway process.

    ``prefix`` namespaces every Redis key (tests use their own); ``clock`` returns
    epoch seconds (windows and periods); ``cooldown_s`` is how long a failed Redis
    is left alone before it is tried again.
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        *,
        prefix: str = "keel:",
        clock: Callable[[], float] = time.time,
        cooldown_s: float = 5.0,
        cache_max_entries: int = 10_000,
        cache_max_bytes: int = 100 * 1024 * 1024,
    ) -> None:
        self.redis_url = settings.redis_url
        self.mode: Literal["open", "closed"] = settings.limits.redis_failure
        self.engine = engine
        self.prefix = prefix
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._cache_caps = (cache_max_entries, cache_max_bytes)
        self.budgets: list[BudgetSettings] = list(settings.budgets)
        self._by_scope: dict[str, list[BudgetSettings]] = {}
        for b in self.budgets:
            self._by_scope.setdefault(b.scope, []).append(b)
        self._models = {
            alias: (spec.rpm, spec.tpm)
            for alias, spec in settings.models.items()
            if spec.rpm is not None or spec.tpm is not None
        }
        self._memory = self._new_memory()
        self._redis: RedisBackend | None = None
        self._fallback: MemoryBackend | None = None
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._last_error: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._seeding: dict[tuple[int, str], asyncio.Future[bool]] = {}
        self._seed_retry_at: dict[str, float] = {}
        self._pday: int | None = None
        self._periods: dict[str, tuple[datetime, datetime, str]] = {}
        self.cache = ResponseCache(self)

    def _new_memory(self) -> MemoryBackend:
        n, size = self._cache_caps
        return MemoryBackend(
            self._clock, MemoryCache(max_entries=n, max_bytes=size, clock=self._clock)
        )

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to Redis when configured. An unreachable Redis does not stop start-up:
        it is an outage like any other (fail-open or fail-closed)."""
        if not self.redis_url or self._redis is not None:
            return
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        client = aioredis.from_url(
            self.redis_url,
            socket_connect_timeout=0.5,
            socket_timeout=1.0,
            # One immediate retry replaces a pooled connection that a Redis restart killed.
            retry=Retry(NoBackoff(), 1),
        )
        self._redis = RedisBackend(client, self.prefix)
        try:
            await self._redis.ping()
        except (RedisError, OSError) as e:
            self._mark_down(e)
        else:
            log.info("limits, budgets and the response cache use Redis at %s", self._where())

    async def aclose(self) -> None:
        """Let scheduled settlements and cache writes finish (5 s at most), then disconnect."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._redis is not None:
            await self._redis.client.aclose()
            self._redis = None

    async def drain(self) -> None:
        """Wait for the settlements and cache writes scheduled so far (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def status(self) -> dict[str, Any]:
        """For /readyz: the backend in use, whether Redis answers, the failure mode."""
        down = self._down_since is not None
        return {
            "backend": "redis" if self._redis is not None and not down else "memory",
            "redis_ok": None if not self.redis_url else (self._redis is not None and not down),
            "mode": self.mode,
            "last_error": self._last_error,
            "down_since": (
                datetime.fromtimestamp(self._down_since, UTC).isoformat() if down else None
            ),
        }

    @property
    def ready(self) -> bool:
        """False only when calls are being refused: Redis down and mode closed."""
        return not (self.mode == "closed" and self.redis_url and self._down_since is not None)

    def _where(self) -> str:
        return _redis_where(self.redis_url or "")

    # -- backend choice and outages -----------------------------------------------------

    def _pick(self, critical: bool) -> Backend:
        r = self._redis
        if r is None:
            return self._memory
        if self._down_since is None:
            return r
        mono = time.monotonic()
        if mono >= self._retry_at:
            self._retry_at = mono + self.cooldown_s  # one caller probes, the rest fall back
            return r
        if critical and self.mode == "closed":
            raise self._unavailable()
        assert self._fallback is not None
        return self._fallback

    def _unavailable(self) -> LimitsUnavailable:
        return LimitsUnavailable(
            "rate limits and budgets cannot be checked: Redis is unreachable and "
            "limits.redis_failure is 'closed'; retry shortly",
            code="limits_unavailable",
        )

    def _mark_down(self, e: BaseException) -> None:
        self._last_error = f"{type(e).__name__}: {e}"[:300]
        self._retry_at = time.monotonic() + self.cooldown_s
        if self._down_since is not None:
            return
        self._down_since = time.time()
        # A fresh in-process backend per outage: it seeds budgets from the store again
        # instead of trusting what an earlier outage left in it.
        self._fallback = self._new_memory()
        if self.mode == "open":
            log.warning(
                "Redis at %s is unreachable (%s): rate limits, budgets and the response cache "
                "are per-process until it answers again (limits.redis_failure=open)",
                self._where(),
                self._last_error,
            )
        else:
            log.error(
                "Redis at %s is unreachable (%s): refusing calls with 503 until it answers "
                "again (limits.redis_failure=closed)",
                self._where(),
                self._last_error,
            )

    def _mark_up(self) -> None:
        if self._down_since is None:
            return
        log.warning(
            "Redis at %s answers again after %.1f s: limits are shared again",
            self._where(),
            time.time() - self._down_since,
        )
        self._down_since = None
        self._fallback = None

    async def _run(self, op: Callable[[Backend], Awaitable[_T]], *, critical: bool) -> _T:
        be = self._pick(critical)
        if be is not self._redis:
            return await op(be)
        try:
            res = await op(be)
        except (RedisError, OSError) as e:
            self._mark_down(e)
            if critical and self.mode == "closed":
                raise self._unavailable() from None
            assert self._fallback is not None
            return await op(self._fallback)
        if self._down_since is not None:
            self._mark_up()
        return res

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:
            coro.close()
            log.error("limits: no running event loop; a settlement or cache write was dropped")
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- periods, seeding -------------------------------------------------------------------

    def _period(self, scope: str, period: str, now: float) -> _Period:
        day = int(now // 86400)
        if day != self._pday:
            self._periods = {}
            for name in ("day", "week", "month"):
                s, e = period_bounds(name, now)
                self._periods[name] = (s, e, s.strftime("%Y-%m-%d"))
            self._pday = day
        s, e, token = self._periods[period]
        return _Period(scope, period, s, e, f"{self.prefix}sp:{scope}:{period}:{token}")

    async def _seed(self, be: Backend, p: _Period) -> bool:
        """Seed every counter of a scope and period from the store (once; concurrent
        callers share one query). False when the store could not be read."""
        k = (id(be), p.marker)
        pending = self._seeding.get(k)
        if pending is not None:
            return await asyncio.shield(pending)
        if self._seed_retry_at.get(p.marker, 0.0) > time.monotonic():
            return False
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._seeding[k] = fut
        try:
            spend: dict[str, float] = {}
            if self.engine is not None:
                try:
                    spend = await asyncio.to_thread(
                        spend_from_store, self.engine, p.scope, _ms(p.start), _ms(p.end)
                    )
                except Exception as e:
                    log.warning(
                        "budgets: could not read %s spend for this %s from the store (%s); "
                        "counting from zero until it answers",
                        p.scope,
                        p.period,
                        e,
                    )
                    self._seed_retry_at[p.marker] = time.monotonic() + SEED_BACKOFF_S
                    fut.set_result(False)
                    return False
            counters = {p.counter(v): (v, round(usd * NANO)) for v, usd in spend.items()}
            await be.seed(p.marker, p.index, counters, p.expire_at)
            fut.set_result(True)
            return True
        except BaseException:
            fut.set_result(False)
            raise
        finally:
            self._seeding.pop(k, None)

    # -- admission ------------------------------------------------------------------------

    def _applicable(
        self,
        key_id: str | None,
        key_name: str | None,
        key_budget: tuple[float, str] | None,
        user: str | None,
        feature: str | None,
    ) -> list[tuple[_BudgetRef, str]]:
        """(budget, mode) for every budget that applies to a request."""
        out: list[tuple[_BudgetRef, str]] = []
        if key_id is not None and key_budget is not None:
            limit, period = key_budget
            ref = _BudgetRef(key_name or key_id, "key", key_id, period, limit, True)
            out.append((ref, "hard"))
        for scope, value, names, label in (
            ("global", "", ("",), ""),
            ("key", key_id, (key_id, key_name), key_name or key_id),
            ("user", user, (user,), user),
            ("feature", feature, (feature,), feature),
        ):
            if value is None:
                continue
            for b in self._by_scope.get(scope, ()):
                if b.match == "*" or b.match in names:
                    ref = _BudgetRef(
                        b.name, scope, value, b.period, b.limit_usd, False, label or ""
                    )
                    out.append((ref, b.mode))
        return out

    async def admit(
        self,
        *,
        key_id: str | None,
        key_rpm: int | None,
        key_tpm: int | None,
        key_budget: tuple[float, str] | None,
        alias: str,
        user: str | None,
        feature: str | None,
        key_name: str | None = None,
    ) -> Admission:
        """Check and count one request; raise :class:`RateLimited`, :class:`BudgetExceeded`
        or (Redis down, mode closed) :class:`LimitsUnavailable`.

        ``key_budget`` is the key's own ``(limit_usd, period)``; ``key_name`` only makes
        messages readable. One Redis round trip (two more, once per scope and period,
        when a budget counter must first be seeded from the store).
        """
        now = self._clock()
        window = int(now // WINDOW_S)
        checks: list[Check] = []
        what: list[Any] = []  # per check: ("rpm"|"tpm", who, limit) or (_BudgetRef, _Period)
        tpm_ids: list[str] = []
        kname = key_name or key_id
        if key_id is not None:
            if key_rpm:
                checks.append(("r", f"{self.prefix}rl:r:k:{key_id}:{window}", key_rpm, None))
                what.append(("rpm", f"key '{kname}'", key_rpm))
            if key_tpm:
                tpm_ids.append(f"k:{key_id}")
                checks.append(("t", f"{self.prefix}rl:t:k:{key_id}:{window}", key_tpm, None))
                what.append(("tpm", f"key '{kname}'", key_tpm))
        rpm, tpm = self._models.get(alias, (None, None))
        if rpm:
            checks.append(("r", f"{self.prefix}rl:r:m:{alias}:{window}", rpm, None))
            what.append(("rpm", f"model '{alias}'", rpm))
        if tpm:
            tpm_ids.append(f"m:{alias}")
            checks.append(("t", f"{self.prefix}rl:t:m:{alias}:{window}", tpm, None))
            what.append(("tpm", f"model '{alias}'", tpm))
        spend: dict[tuple[str, str, str], None] = {}
        names: list[str] = []
        nb = 0
        if self.budgets or key_budget is not None:
            for ref, mode in self._applicable(key_id, key_name, key_budget, user, feature):
                spend[(ref.scope, ref.value, ref.period)] = None
                names.append(ref.name)
                if mode == "hard":
                    p = self._period(ref.scope, ref.period, now)
                    # Budgets first: a spent budget is the more useful answer.
                    checks.insert(
                        nb, ("b", p.counter(ref.value), round(ref.limit_usd * NANO), p.marker)
                    )
                    what.insert(nb, (ref, p))
                    nb += 1
        adm = Admission(alias, key_id, tuple(tpm_ids), tuple(spend), tuple(names))
        if not checks:
            return adm

        async def op(be: Backend) -> tuple[Any, ...]:
            res = await be.admit(checks, False)
            if res[0] == 2:
                periods = {what[i][1].marker: what[i][1] for i in res[1]}
                for p in periods.values():
                    await self._seed(be, p)
                res = await be.admit(checks, True)
            return res

        res = await self._run(op, critical=True)
        if res[0] == 1:
            raise self._refusal(what[res[1]], res[2], now)
        return adm

    def _refusal(self, what: Any, used: int, now: float) -> KeelError:
        if isinstance(what[0], _BudgetRef):
            ref, p = what
            spent = used / NANO
            resets = _iso(p.end)
            if ref.own_key:
                who, budget = (
                    f"key '{ref.name}'",
                    f"its {_usd(ref.limit_usd)} {_PERIODLY[ref.period]} budget",
                )
            else:
                who = "the gateway" if ref.scope == "global" else f"{ref.scope} '{ref.label}'"
                budget = f"its {_usd(ref.limit_usd)} {_PERIODLY[ref.period]} budget '{ref.name}'"
            return BudgetExceeded(
                f"{who} has spent {_usd(spent)} of {budget}; it resets {resets}",
                budget=ref.name,
                spent_usd=round(spent, 6),
                limit_usd=ref.limit_usd,
                resets_at=resets,
                retry_after_s=max(1, math.ceil(p.end.timestamp() - now)),
            )
        kind, who, limit = what
        retry = max(1, math.ceil(WINDOW_S - now % WINDOW_S))
        if kind == "rpm":
            msg = f"Rate limit reached for {who}: {limit} requests per minute"
        else:
            msg = f"Token limit reached for {who}: {used} of {limit} tokens per minute used"
        return RateLimited(f"{msg}. Retry in {retry} s.", retry_after_s=retry)

    # -- settlement -----------------------------------------------------------------------

    def settle(self, adm: Admission, *, tokens: int, cost_usd: float | None) -> None:
        """Add a finished call's tokens and spend to its counters, in the background.
        Never raises; failures are logged."""
        try:
            tokens = max(int(tokens or 0), 0) if adm.tpm_ids else 0
            nano = round(cost_usd * NANO) if cost_usd and cost_usd > 0 and adm.spend else 0
            if tokens or nano:
                self._spawn(self._settle(adm, tokens, nano))
        except Exception:
            log.exception("limits: could not schedule a settlement")

    async def _settle(self, adm: Admission, tokens: int, nano: int) -> None:
        now = self._clock()
        window = int(now // WINDOW_S)
        tpm_keys = [f"{self.prefix}rl:t:{i}:{window}" for i in adm.tpm_ids] if tokens else []
        items: list[SpendItem] = []
        periods: list[_Period] = []
        if nano:
            for scope, value, period in adm.spend:
                p = self._period(scope, period, now)
                periods.append(p)
                items.append((p.counter(value), p.marker, p.index, value, p.expire_at))

        async def op(be: Backend) -> None:
            missing = await be.settle(tpm_keys, tokens, items, nano)
            if not missing:
                return
            seeded = {}
            for j in missing:
                p = periods[j]
                if p.marker not in seeded:
                    seeded[p.marker] = await self._seed(be, p)
            # Not seeded (store down): skip; the store has the call and a later seed counts it.
            again = [items[j] for j in missing if seeded[periods[j].marker]]
            if again:
                await be.settle([], 0, again, nano)

        try:
            await self._run(op, critical=False)
        except Exception:
            log.exception("limits: could not settle a call's tokens and spend")

    # -- budgets overview -----------------------------------------------------------------

    async def _read(self, p: _Period) -> dict[str, int]:
        async def op(be: Backend) -> dict[str, int]:
            spend = await be.read_spend(p)
            if spend is None:
                await self._seed(be, p)
                spend = await be.read_spend(p)
            return spend or {}

        return await self._run(op, critical=False)

    async def budget_status(self) -> list[dict[str, Any]]:
        """Every configured budget (per value for ``match: '*'``) with spend so far."""
        now = self._clock()
        out: list[dict[str, Any]] = []
        cache: dict[str, dict[str, int]] = {}
        for b in self.budgets:
            p = self._period(b.scope, b.period, now)
            if p.base not in cache:
                cache[p.base] = await self._read(p)
            spend = cache[p.base]
            if b.scope == "global":
                values = {"": spend.get("", 0)}
            elif b.match == "*":
                values = spend
            else:
                ids = [b.match, *(await self._key_ids(b.match) if b.scope == "key" else [])]
                values = {b.match: sum(spend.get(v, 0) for v in dict.fromkeys(ids))}
            for value, nano in sorted(values.items()):
                spent = nano / NANO
                out.append(
                    {
                        "name": b.name,
                        "scope": b.scope,
                        "value": value,
                        "spent_usd": round(spent, 6),
                        "limit_usd": b.limit_usd,
                        "period": b.period,
                        "period_end": _iso(p.end),
                        "ratio": spent / b.limit_usd,
                        "mode": b.mode,
                    }
                )
        return out

    async def _key_ids(self, name: str) -> list[str]:
        """Ids of the keys called ``name`` (budgets may match a key by name)."""
        if self.engine is None:
            return []
        from keel.store.tables import api_keys

        def run() -> list[str]:
            with self.engine.connect() as conn:  # type: ignore[union-attr]
                return list(
                    conn.execute(select(api_keys.c.id).where(api_keys.c.name == name)).scalars()
                )

        try:
            return await asyncio.to_thread(run)
        except Exception:
            log.exception("budgets: could not look up key %r", name)
            return []

    async def key_spend(self, key_id: str, period: str) -> float:
        """USD a key spent in the current period (for the keys API)."""
        p = self._period("key", period, self._clock())
        return (await self._read(p)).get(key_id, 0) / NANO


class BudgetOut(BaseModel):
    name: str
    scope: Literal["global", "key", "user", "feature"]
    value: str
    spent_usd: float
    limit_usd: float
    period: Literal["day", "week", "month"]
    period_end: str
    ratio: float
    mode: Literal["hard", "soft"]


class BudgetList(BaseModel):
    data: list[BudgetOut]


def make_router(limits: Limits) -> APIRouter:
    r = APIRouter(prefix="/api/budgets", tags=["costs"])

    @r.get("", response_model=BudgetList, summary="Budgets with spend in the current period")
    async def _budgets() -> dict[str, Any]:
        return {"data": await limits.budget_status()}

    return r


__all__ = [
    "Admission",
    "BudgetExceeded",
    "Limits",
    "LimitsUnavailable",
    "RateLimited",
    "make_router",
    "period_bounds",
    "spend_from_store",
]
