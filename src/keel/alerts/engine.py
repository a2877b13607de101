"""The rule engine: evaluates rules on an interval and runs each alert's state machine.

For every rule and label set::

    ok ──condition──▶ pending ──held for `for`──▶ firing ──condition gone──▶ resolved
     ▲                   │                          │  └─ re-notify every renotify_interval_s
     └──condition gone───┘                          └─ (for: 0 goes straight to firing)

States live in ``alert_states`` and every transition in ``alert_events``, written
in one transaction per tick *before* notifications go out: a restart resumes
each alert where it was, and an alert that was announced is not announced
again (at most once). Silences suppress notifications, not state changes; an
alert that fired while silenced is announced when the silence ends, if it is
still firing. Notifications of one tick are grouped into one message per channel.

The engine runs on one replica at a time (a lease), evaluates in a worker
thread, and hands notifications to the dispatcher without waiting for them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlencode

import orjson
from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from keel._ids import new_id
from keel.alerts.model import Labels, Notification, labels_key
from keel.alerts.signals import SIGNALS, EvalContext, SignalQuery
from keel.config import AlertsSettings, RuleSettings
from keel.daemon import Daemon, now_ms
from keel.store.tables import alert_events, alert_rules, alert_silences, alert_states

log = logging.getLogger("keel.alerts")


def load_api_rules(engine: Engine) -> list[RuleSettings]:
    with engine.connect() as conn:
        rows = conn.execute(select(alert_rules.c.spec).order_by(alert_rules.c.name)).all()
    out = []
    for (spec,) in rows:
        try:
            out.append(RuleSettings.model_validate(orjson.loads(spec)))
        except Exception as e:  # a rule stored by an older version: skip, say so
            log.error("skipping an unreadable stored alert rule: %s", e)
    return out


@dataclass
class Silence:
    id: str
    rule: str | None
    matchers: dict[str, str]
    ends_at_ms: int

    def matches(self, rule: str, labels: dict[str, str]) -> bool:
        if self.rule is not None and self.rule != rule:
            return False
        return all(labels.get(k) == v for k, v in self.matchers.items())


def active_silences(conn: Connection, now: int) -> list[Silence]:
    rows = conn.execute(
        select(alert_silences).where(
            alert_silences.c.starts_at_ms <= now, alert_silences.c.ends_at_ms > now
        )
    ).all()
    return [Silence(r.id, r.rule, orjson.loads(r.matchers), r.ends_at_ms) for r in rows]


def _compare(op: str, value: float | None, threshold: float) -> bool:
    if value is None:
        return False
    return value > threshold if op == "above" else value < threshold


class RuleEvaluator:
    """Pure evaluation of the rules at one instant (blocking; call from a thread)."""

    def __init__(self, engine: Engine, settings: AlertsSettings, base_url: str) -> None:
        self.engine = engine
        self.settings = settings
        self.base_url = base_url.rstrip("/")

    def rules(self) -> list[RuleSettings]:
        api = load_api_rules(self.engine)
        config_names = {r.name for r in self.settings.rules}
        return [*self.settings.rules, *(r for r in api if r.name not in config_names)]

    def values_for(self, ctx: EvalContext, rule: RuleSettings) -> dict[Labels, float | None]:
        sig = SIGNALS[rule.signal]
        q = SignalQuery(
            window_ms=int(rule.window * 1000),
            end_ms=ctx.now_ms,
            filters=tuple(sorted(rule.filters.items())),
            group_by=tuple(rule.group_by),
        )
        now_vals = sig.values(ctx, q)
        c = rule.condition
        if c.mode == "value":
            return now_vals
        if c.mode == "change":
            base = sig.values(ctx, replace(q, end_ms=ctx.now_ms - int(c.compare_to * 1000)))
            out: dict[Labels, float | None] = {}
            for k, v in now_vals.items():
                b = base.get(k)
                out[k] = None if v is None or not b else (v - b) / abs(b) * 100.0
            return out
        prev = sig.values(ctx, replace(q, end_ms=ctx.now_ms - q.window_ms))
        minutes = rule.window / 60.0
        return {
            k: (None if v is None or prev.get(k) is None else (v - prev[k]) / minutes)
            for k, v in now_vals.items()
        }

    def links(self, rule: RuleSettings, labels: dict[str, str]) -> dict[str, str]:
        b = self.base_url
        links = {"alert": f"{b}/api/alerts?{urlencode({'rule': rule.name})}"}
        trace_filters = {k: labels[k] for k in ("model", "feature", "user") if k in labels}
        if rule.signal in ("error_rate", "errors"):
            trace_filters["status"] = "error"
        if trace_filters or rule.signal.startswith(("latency", "ttft", "error")):
            since = f"{max(1, int(rule.window // 60))}m"
            links["traces"] = f"{b}/api/traces?{urlencode({**trace_filters, 'since': since})}"
        if "component" in labels:
            links["component"] = f"{b}/api/components/{labels['component']}"
        return links

    def evaluate(self, now: int) -> tuple[dict[str, list[Notification]], dict[str, int]]:
        """One round: returns notifications by channel, and counts for logging/tests."""
        rules = [r for r in self.rules() if r.enabled and r.signal in SIGNALS]
        ctx = EvalContext(self.engine, now)
        counts = {"rules": len(rules), "transitions": 0, "notifications": 0}
        by_channel: dict[str, list[Notification]] = defaultdict(list)
        with self.engine.connect() as conn:
            rows = conn.execute(select(alert_states)).all()
            silences = active_silences(conn, now)
        states = {(r.rule, r.labels_key): dict(r._mapping) for r in rows}
        upserts: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        for rule in rules:
            try:
                values = self.values_for(ctx, rule)
            except Exception as e:
                log.exception("alert rule %s: signal %s failed", rule.name, rule.signal)
                events.append(self._event(now, rule, (), "error", None, f"signal failed: {e}"))
                continue
            keys = set(values)
            keys |= {
                tuple(sorted(orjson.loads(s["labels"]).items()))
                for (rn, _), s in states.items()
                if rn == rule.name and s["state"] in ("pending", "firing")
            }
            for labels in keys:
                value = values.get(labels)
                cond = _compare(rule.condition.op, value, rule.condition.threshold)
                key = (rule.name, labels_key(labels))
                st = states.get(key)
                new, kind = self._step(rule, st, cond, value, now)
                if new is None:
                    continue
                new["labels_key"] = key[1]
                new["labels"] = orjson.dumps(dict(labels)).decode()
                upserts.append(new)
                if kind is None:
                    continue
                lbl = {**rule.filters, **dict(labels)}
                silenced = any(s.matches(rule.name, lbl) for s in silences)
                if kind in ("firing", "renotify", "resolved"):
                    if kind == "resolved" and st and st.get("last_notified_ms") is None:
                        kind_note = "resolved"  # never announced (silenced): stay quiet
                        events.append(self._event(now, rule, labels, kind_note, value, None))
                        counts["transitions"] += 1
                        continue
                    if silenced:
                        events.append(
                            self._event(
                                now, rule, labels, "silenced", value, f"{kind} while silenced"
                            )
                        )
                        if kind != "resolved":
                            new["last_notified_ms"] = st.get("last_notified_ms") if st else None
                        counts["transitions"] += 1
                        continue
                    n = self._notification(rule, kind, lbl, value, new, now)
                    for ch in rule.channels:
                        by_channel[ch].append(n)
                    counts["notifications"] += 1
                    new["last_notified_ms"] = (
                        now if kind != "resolved" else new.get("last_notified_ms")
                    )
                events.append(self._event(now, rule, labels, kind, value, None))
                counts["transitions"] += 1
        # Rules that were deleted: forget their states.
        live = {r.name for r in rules}
        stale = {rn for (rn, _) in states if rn not in live}
        with self.engine.begin() as conn:
            if upserts:
                _upsert_states(conn, upserts)
            if events:
                conn.execute(alert_events.insert(), events)
            if stale:
                conn.execute(delete(alert_states).where(alert_states.c.rule.in_(stale)))
        return dict(by_channel), counts

    def _step(
        self,
        rule: RuleSettings,
        st: dict[str, Any] | None,
        cond: bool,
        value: float | None,
        now: int,
    ) -> tuple[dict[str, Any] | None, str | None]:
        """Next state row and the transition kind (None: no event)."""
        state = st["state"] if st else "ok"
        row = (
            dict(st)
            if st
            else {
                "rule": rule.name,
                "labels_key": None,
                "labels": None,
                "state": "ok",
                "value": None,
                "threshold": None,
                "pending_since_ms": None,
                "firing_since_ms": None,
                "resolved_at_ms": None,
                "last_eval_ms": None,
                "last_notified_ms": None,
                "severity": rule.severity,
            }
        )
        row.update(
            value=value,
            threshold=rule.condition.threshold,
            last_eval_ms=now,
            severity=rule.severity,
        )
        for_ms = int(rule.for_ * 1000)
        kind = None
        if cond:
            if state in ("ok", "resolved"):
                row["pending_since_ms"] = now
                row["resolved_at_ms"] = None
                if for_ms == 0:
                    row.update(state="firing", firing_since_ms=now, last_notified_ms=None)
                    kind = "firing"
                else:
                    row["state"] = "pending"
                    kind = "pending"
            elif state == "pending":
                if now - (row["pending_since_ms"] or now) >= for_ms:
                    row.update(state="firing", firing_since_ms=now, last_notified_ms=None)
                    kind = "firing"
            elif state == "firing":
                last = row.get("last_notified_ms")
                if last is None:
                    kind = "firing"  # never announced (was silenced): announce now
                elif now - last >= self.settings.renotify_interval_s * 1000:
                    kind = "renotify"
        else:
            if state == "pending":
                row.update(state="ok", pending_since_ms=None)
                kind = "ok"
            elif state == "firing":
                row.update(state="resolved", resolved_at_ms=now)
                kind = "resolved"
            elif st is None:
                return None, None  # never seen, nothing wrong: do not store "ok" rows
        return row, kind

    def _notification(
        self,
        rule: RuleSettings,
        kind: str,
        labels: dict[str, str],
        value: float | None,
        row: dict[str, Any],
        now: int,
    ) -> Notification:
        sig = SIGNALS[rule.signal]
        since = row.get("pending_since_ms") or row.get("firing_since_ms") or now
        return Notification(
            rule=rule.name,
            kind=kind,
            severity=rule.severity,  # type: ignore[arg-type]
            signal=rule.signal,
            labels=labels,
            value=value,
            threshold=rule.condition.threshold,
            op=rule.condition.op,
            mode=rule.condition.mode,
            window_s=rule.window,
            since_ms=since,
            ts_ms=now,
            unit="percent" if rule.condition.mode == "change" else sig.unit,
            description=rule.description,
            runbook_url=rule.runbook_url,
            compare_to_s=rule.condition.compare_to if rule.condition.mode == "change" else None,
            links=self.links(rule, labels),
        )

    def _event(
        self,
        now: int,
        rule: RuleSettings,
        labels: Labels,
        kind: str,
        value: float | None,
        message: str | None,
    ) -> dict[str, Any]:
        lbl = {**rule.filters, **dict(labels)}
        return {
            "id": new_id(),
            "ts_ms": now,
            "rule": rule.name,
            "labels_key": labels_key(labels),
            "labels": orjson.dumps(lbl).decode(),
            "kind": kind,
            "value": value,
            "threshold": rule.condition.threshold,
            "severity": rule.severity,
            "message": message,
        }


def _upsert_states(conn: Connection, rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if r["labels_key"] is None:
            raise AssertionError("state row without labels")
    mod = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = mod.insert(alert_states)
    cols = [c.name for c in alert_states.columns if c.name not in ("rule", "labels_key")]
    stmt = stmt.on_conflict_do_update(
        index_elements=["rule", "labels_key"], set_={c: stmt.excluded[c] for c in cols}
    )
    conn.execute(stmt, rows)


class AlertEngine(Daemon):
    name = "alerts"
    singleton = True

    def __init__(
        self, engine: Engine, settings: AlertsSettings, dispatcher: Any, base_url: str
    ) -> None:
        self.interval_s = settings.evaluation_interval_s
        super().__init__(engine)
        self.evaluator = RuleEvaluator(engine, settings, base_url)
        self.dispatcher = dispatcher
        self.last_counts: dict[str, int] = {}

    async def tick(self) -> None:
        by_channel, counts = await asyncio.to_thread(self._evaluate)
        self.last_counts = counts
        if by_channel:
            self.dispatcher.dispatch(by_channel)

    def _evaluate(self) -> tuple[dict[str, list[Notification]], dict[str, int]]:
        return self.evaluator.evaluate(now_ms())

    async def stop(self) -> None:
        await super().stop()
        try:
            await self.dispatcher.drain(10)
        finally:
            await self.dispatcher.aclose()
