"""The ``budget_used_percent`` signal: spend so far in each budget's current period.

Importing this module registers the signal; :func:`configure` gives it the
configured budgets (``app.py`` calls it with ``settings.budgets``). Keys' own
budgets (``api_keys.budget_usd``) are included too, labelled ``budget="key <name>"``.

Spend is read from the rollups (the same sums the gateway seeds its counters
from), so soft budgets alert through ordinary rules, e.g.
``{signal: budget_used_percent, condition: {op: above, threshold: 80}}``. The
rule's window is ignored: a budget's window is its period (day, week, month).
Without ``group_by`` there is one value per budget and scope value; with it, the
largest percentage of each group.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select

from keel.alerts.model import Labels
from keel.alerts.signals import EvalContext, Signal, SignalQuery, register_signal
from keel.config import BudgetSettings
from keel.gateway.limits import period_bounds, spend_from_store
from keel.store.tables import api_keys

log = logging.getLogger("keel.alerts")

_BUDGETS: list[BudgetSettings] = []


def configure(budgets: list[BudgetSettings]) -> None:
    """The budgets the signal reports on (call once at start-up)."""
    _BUDGETS[:] = list(budgets)


def _spend(ctx: EvalContext, scope: str, period: str, end_ms: int) -> tuple[dict[str, float], int]:
    start, end = period_bounds(period, (end_ms - 1) / 1000)
    s, e = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    key = ("budget-spend", scope, s, min(e, end_ms))
    if key not in ctx.cache:
        ctx.cache[key] = spend_from_store(ctx.engine, scope, s, min(e, end_ms))
    return ctx.cache[key], e


def _keys(ctx: EvalContext) -> list[Any]:
    """(id, name, budget_usd, budget_period) of every key not revoked."""
    if "budget-keys" not in ctx.cache:
        t = api_keys
        stmt = select(t.c.id, t.c.name, t.c.budget_usd, t.c.budget_period).where(
            t.c.revoked_at_ms.is_(None)
        )
        try:
            with ctx.engine.connect() as conn:
                ctx.cache["budget-keys"] = conn.execute(stmt).all()
        except Exception as e:  # an older schema without keys: configured budgets only
            log.debug("budget_used_percent: cannot read api_keys: %s", e)
            ctx.cache["budget-keys"] = []
    return ctx.cache["budget-keys"]


@register_signal
class BudgetUsedPercent(Signal):
    name = "budget_used_percent"
    description = (
        "Share of each budget spent in its current period (100 = the limit). "
        "The window is ignored: a budget's window is its period."
    )
    unit = "percent"
    labels = ("budget", "scope", "value")

    def items(self, ctx: EvalContext, end_ms: int) -> list[tuple[dict[str, str], float]]:
        out: list[tuple[dict[str, str], float]] = []
        for b in _BUDGETS:
            spend, _ = _spend(ctx, b.scope, b.period, end_ms)
            if b.scope == "global":
                values = {"": spend.get("", 0.0)}
            elif b.match == "*":
                values = spend
            else:
                # A key budget may name the key rather than its id.
                ids = {b.match}
                if b.scope == "key":
                    ids |= {k[0] for k in _keys(ctx) if k[1] == b.match}
                values = {b.match: sum(spend.get(i, 0.0) for i in ids)}
            for value, usd in values.items():
                labels = {"budget": b.name, "scope": b.scope, "value": value}
                out.append((labels, usd * 100.0 / b.limit_usd))
        for key_id, name, limit, period in _keys(ctx):
            if not limit or limit <= 0 or period not in ("day", "week", "month"):
                continue
            spend, _ = _spend(ctx, "key", period, end_ms)
            labels = {"budget": f"key {name}", "scope": "key", "value": key_id}
            out.append((labels, spend.get(key_id, 0.0) * 100.0 / limit))
        return out

    def values(self, ctx: EvalContext, q: SignalQuery) -> dict[Labels, float | None]:
        keys = sorted(set(q.group_by)) or list(self.labels)
        out: dict[Labels, float | None] = {}
        for labels, pct in self.items(ctx, q.end_ms):
            if any(labels.get(k) != v for k, v in q.filters):
                continue
            group = tuple((k, labels[k]) for k in keys)
            prev = out.get(group)
            out[group] = pct if prev is None else max(prev, pct)
        return out


__all__ = ["BudgetUsedPercent", "configure"]
