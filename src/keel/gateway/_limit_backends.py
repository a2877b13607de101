"""Counter backends of :mod:`keel.gateway.limits`: Redis (two Lua scripts, one round trip
each) and an in-process equivalent on dicts, with the check and counter types they share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from keel.gateway.cache import MemoryCache

WINDOW_S = 60
RATE_TTL_S = 2 * WINDOW_S
NANO = 1_000_000_000
#: Kept after a period ends, so a request racing the reset still finds its counter.
PERIOD_SLACK_S = 3600


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
