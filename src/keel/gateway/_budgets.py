"""Budgets of :mod:`keel.gateway.limits`: period arithmetic, seeding spend counters from
the store's rollups, which budgets apply to a request, and the budgets overview."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Float, cast, func, select
from sqlalchemy.engine import Engine

from keel.config import BudgetSettings
from keel.gateway._limit_backends import NANO, Backend, _Period
from keel.store.tables import rollups_dim_minute, rollups_hour

# The limits' own logger: budget warnings come from the same source as before the split.
log = logging.getLogger("keel.gateway.limits")
_T = TypeVar("_T")

SEED_BACKOFF_S = 30.0
_DIMENSION = {"key": "key", "user": "user", "feature": "feature"}
_PERIODLY = {"day": "daily", "week": "weekly", "month": "monthly"}


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
class _BudgetRef:
    name: str  # shown in messages and errors
    scope: str
    value: str
    period: str
    limit_usd: float
    own_key: bool = False
    label: str = ""  # who, in messages: the key's name rather than its id


def _usd(x: float) -> str:
    return f"${x:.2f}" if x == 0 or abs(x) >= 0.01 else f"${x:.4g}"


class _BudgetsMixin:
    """The budget half of :class:`~keel.gateway.limits.Limits` (which sets these attributes)."""

    engine: Engine | None
    prefix: str
    budgets: list[BudgetSettings]
    _by_scope: dict[str, list[BudgetSettings]]
    _clock: Callable[[], float]
    _seeding: dict[tuple[int, str], asyncio.Future[bool]]
    _seed_retry_at: dict[str, float]
    _pday: int | None
    _periods: dict[str, tuple[datetime, datetime, str]]

    if TYPE_CHECKING:

        async def _run(self, op: Callable[[Backend], Awaitable[_T]], *, critical: bool) -> _T: ...

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

    # -- which budgets apply ----------------------------------------------------------------

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
