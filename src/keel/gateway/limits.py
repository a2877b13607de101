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
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from fastapi import APIRouter
from pydantic import BaseModel
from redis.exceptions import RedisError
from sqlalchemy.engine import Engine

from keel.config import BudgetSettings, Settings
from keel.errors import KeelError
from keel.gateway._budgets import (
    _PERIODLY,
    SEED_BACKOFF_S,  # noqa: F401  (re-exported, as are the names in __all__)
    _BudgetRef,
    _BudgetsMixin,
    _iso,
    _usd,
    period_bounds,
    spend_from_store,
)
from keel.gateway._limit_backends import (
    NANO,
    PERIOD_SLACK_S,  # noqa: F401
    RATE_TTL_S,  # noqa: F401
    WINDOW_S,
    Backend,
    Check,
    MemoryBackend,
    RedisBackend,
    SpendItem,
    _Period,
)
from keel.gateway._limit_errors import BudgetExceeded, LimitsUnavailable, RateLimited
from keel.gateway.cache import MemoryCache, ResponseCache

log = logging.getLogger("keel.gateway.limits")
_T = TypeVar("_T")


# -- the policy -----------------------------------------------------------------------------


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


def _redis_where(url: str) -> str:
    # Never log credentials: keep host, port and db.
    rest = url.split("://", 1)[-1]
    return rest.rsplit("@", 1)[-1]


class Limits(_BudgetsMixin):
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

    # -- admission ------------------------------------------------------------------------

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
