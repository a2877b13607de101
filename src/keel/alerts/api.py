"""REST: alerts, rules, silences, deliveries, test messages, signals."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from fastapi import APIRouter, Body, Query
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from keel._ids import new_id
from keel.alerts.engine import load_api_rules
from keel.config import AlertsSettings, RuleSettings, format_validation_error, parse_duration
from keel.daemon import now_ms
from keel.errors import Conflict, InvalidRequest, NotFound
from keel.store.tables import alert_events, alert_rules, alert_silences, alert_states


def check_rule(rule: RuleSettings, settings: AlertsSettings) -> None:
    """Signal known, labels valid, channels configured; raises ValueError naming the field."""
    import keel.alerts.budget_signal  # noqa: F401
    from keel.alerts.sources import validate_rule
    from keel.evals import signals as _eval_signals  # noqa: F401  (registers eval_*)

    validate_rule(rule)
    for ch in rule.channels:
        if ch not in settings.channels:
            raise ValueError(
                f"channels: unknown channel '{ch}' "
                f"(known: {', '.join(sorted(settings.channels)) or 'none'})"
            )


def validate_alert_config(settings: AlertsSettings, source: str = "configuration") -> None:
    """Reject rules whose signal or labels are unknown, naming the rule and the field.

    (Channels and duplicates are already checked by the schema.)"""
    import keel.alerts.budget_signal  # noqa: F401  (registers budget_used_percent)
    from keel.alerts.sources import validate_rule
    from keel.errors import ConfigError
    from keel.evals import signals as _eval_signals  # noqa: F401  (registers eval_*)

    problems = []
    for i, rule in enumerate(settings.rules):
        try:
            validate_rule(rule)
        except ValueError as e:
            problems.append(f"  alerts.rules.{i} ({rule.name}).{e}")
    if problems:
        raise ConfigError(
            f"{source}: {len(problems)} invalid alert rule(s)\n" + "\n".join(problems)
        )


def parse_rule(data: Any, settings: AlertsSettings) -> RuleSettings:
    try:
        rule = RuleSettings.model_validate(data)
    except ValidationError as e:
        raise InvalidRequest(format_validation_error(e, "rule").replace("\n", "; ")) from None
    try:
        check_rule(rule, settings)
    except ValueError as e:
        raise InvalidRequest(f"rule {rule.name}: {e}") from None
    return rule


class Event(BaseModel):
    ts_ms: int
    kind: str
    value: float | None
    threshold: float | None
    message: str | None = None


class Alert(BaseModel):
    rule: str
    labels: dict[str, str]
    state: Literal["ok", "pending", "firing", "resolved"]
    severity: str | None
    value: float | None
    threshold: float | None
    pending_since_ms: int | None
    firing_since_ms: int | None
    resolved_at_ms: int | None
    last_eval_ms: int | None
    last_notified_ms: int | None
    silenced: bool
    history: list[Event]


class AlertList(BaseModel):
    data: list[Alert]


class RuleOut(BaseModel):
    name: str
    source: Literal["config", "api"]
    spec: dict[str, Any]


class RuleList(BaseModel):
    data: list[RuleOut]


class SilenceIn(BaseModel):
    rule: str | None = Field(None, description="Only this rule (default: any rule).")
    matchers: dict[str, str] = Field(default_factory=dict, description="Labels that must match.")
    duration: str | float = Field("1h", description="How long: 30m, 2h, 1d or seconds.")
    comment: str | None = None
    created_by: str | None = None


class SilenceOut(BaseModel):
    id: str
    rule: str | None
    matchers: dict[str, str]
    starts_at_ms: int
    ends_at_ms: int
    comment: str | None
    created_by: str | None


class SilenceList(BaseModel):
    data: list[SilenceOut]


def list_alerts(
    engine: Engine,
    settings: AlertsSettings,
    state: str = "active",
    rule: str | None = None,
    history: int = 20,
) -> list[dict[str, Any]]:
    if state not in ("active", "firing", "pending", "resolved", "all"):
        raise InvalidRequest(
            "'state' must be active, firing, pending, resolved or all", param="state"
        )
    now = now_ms()
    q = select(alert_states)
    if rule:
        q = q.where(alert_states.c.rule == rule)
    if state == "active":
        q = q.where(alert_states.c.state.in_(("pending", "firing")))
    elif state != "all":
        q = q.where(alert_states.c.state == state)
    filters = {r.name: r.filters for r in settings.rules}
    out = []
    with engine.connect() as conn:
        rows = conn.execute(q.order_by(alert_states.c.rule)).all()
        silences = conn.execute(
            select(alert_silences).where(
                alert_silences.c.starts_at_ms <= now, alert_silences.c.ends_at_ms > now
            )
        ).all()
        for r in rows:
            labels = {**filters.get(r.rule, {}), **orjson.loads(r.labels)}
            ev = conn.execute(
                select(alert_events)
                .where(alert_events.c.rule == r.rule, alert_events.c.labels_key == r.labels_key)
                .order_by(alert_events.c.ts_ms.desc())
                .limit(history)
            ).all()
            silenced = any(
                (s.rule is None or s.rule == r.rule)
                and all(labels.get(k) == v for k, v in orjson.loads(s.matchers).items())
                for s in silences
            )
            d = dict(r._mapping)
            d.pop("labels_key")
            d["labels"] = labels
            d["silenced"] = silenced
            d["history"] = [
                {
                    "ts_ms": e.ts_ms,
                    "kind": e.kind,
                    "value": e.value,
                    "threshold": e.threshold,
                    "message": e.message,
                }
                for e in ev
            ]
            out.append(d)
    order = {"firing": 0, "pending": 1, "resolved": 2, "ok": 3}
    out.sort(key=lambda a: (order.get(a["state"], 9), -(a["firing_since_ms"] or 0)))
    return out


def make_router(engine: Engine, settings: AlertsSettings, dispatcher: Any) -> APIRouter:
    r = APIRouter(prefix="/api/alerts", tags=["alerts"])

    @r.get("", response_model=AlertList, summary="Firing and recent alerts with history")
    def _alerts(
        state: str = Query("active", description="active, firing, pending, resolved, all"),
        rule: str | None = None,
    ) -> dict[str, Any]:
        return {"data": list_alerts(engine, settings, state, rule)}

    @r.get("/rules", response_model=RuleList, summary="Rules from keel.yaml and from the API")
    def _rules() -> dict[str, Any]:
        data = [
            {"name": x.name, "source": "config", "spec": x.model_dump(by_alias=True)}
            for x in settings.rules
        ]
        names = {x.name for x in settings.rules}
        data += [
            {"name": x.name, "source": "api", "spec": x.model_dump(by_alias=True)}
            for x in load_api_rules(engine)
            if x.name not in names
        ]
        return {"data": data}

    @r.get("/rules/{name}", response_model=RuleOut, summary="One rule")
    def _rule(name: str) -> dict[str, Any]:
        for x in _rules()["data"]:
            if x["name"] == name:
                return x
        raise NotFound(f"no alert rule named '{name}'", code="rule_not_found")

    @r.post("/rules", response_model=RuleOut, status_code=201, summary="Create a rule")
    def _create(
        spec: dict[str, Any] = Body(..., description="A rule, as in keel.yaml."),
    ) -> dict[str, Any]:
        rule = parse_rule(spec, settings)
        if rule.name in {x.name for x in settings.rules}:
            raise Conflict(f"rule '{rule.name}' is defined in keel.yaml")
        t = now_ms()
        try:
            with engine.begin() as conn:
                conn.execute(
                    insert(alert_rules).values(
                        name=rule.name,
                        spec=rule.model_dump_json(by_alias=True),
                        created_at_ms=t,
                        updated_at_ms=t,
                    )
                )
        except IntegrityError:
            raise Conflict(
                f"rule '{rule.name}' exists; PUT /api/alerts/rules/{rule.name} to change it"
            ) from None
        return {"name": rule.name, "source": "api", "spec": rule.model_dump(by_alias=True)}

    @r.put("/rules/{name}", response_model=RuleOut, summary="Replace a rule made by the API")
    def _replace(name: str, spec: dict[str, Any] = Body(...)) -> dict[str, Any]:
        if name in {x.name for x in settings.rules}:
            raise Conflict(f"rule '{name}' is defined in keel.yaml; change it there")
        rule = parse_rule({**spec, "name": name}, settings)
        with engine.begin() as conn:
            n = conn.execute(
                update(alert_rules)
                .where(alert_rules.c.name == name)
                .values(spec=rule.model_dump_json(by_alias=True), updated_at_ms=now_ms())
            ).rowcount
        if not n:
            raise NotFound(f"no API-made alert rule named '{name}'", code="rule_not_found")
        return {"name": name, "source": "api", "spec": rule.model_dump(by_alias=True)}

    @r.delete("/rules/{name}", status_code=204, summary="Delete a rule made by the API")
    def _delete(name: str) -> None:
        if name in {x.name for x in settings.rules}:
            raise Conflict(f"rule '{name}' is defined in keel.yaml; remove it there")
        with engine.begin() as conn:
            n = conn.execute(delete(alert_rules).where(alert_rules.c.name == name)).rowcount
        if not n:
            raise NotFound(f"no API-made alert rule named '{name}'", code="rule_not_found")

    @r.get("/silences", response_model=SilenceList, summary="Active and future silences")
    def _silences() -> dict[str, Any]:
        with engine.connect() as conn:
            rows = conn.execute(
                select(alert_silences)
                .where(alert_silences.c.ends_at_ms > now_ms())
                .order_by(alert_silences.c.ends_at_ms)
            ).all()
        return {"data": [{**dict(x._mapping), "matchers": orjson.loads(x.matchers)} for x in rows]}

    @r.post(
        "/silences",
        response_model=SilenceOut,
        status_code=201,
        summary="Mute a rule or labels until a time",
    )
    def _silence(body: SilenceIn) -> dict[str, Any]:
        try:
            seconds = parse_duration(body.duration)
        except ValueError as e:
            raise InvalidRequest(f"duration: {e}", param="duration") from None
        if seconds <= 0:
            raise InvalidRequest("duration must be positive", param="duration")
        if body.rule is None and not body.matchers:
            raise InvalidRequest("a silence needs a rule or at least one matcher")
        t = now_ms()
        row = {
            "id": new_id(),
            "rule": body.rule,
            "matchers": orjson.dumps(body.matchers).decode(),
            "starts_at_ms": t,
            "ends_at_ms": t + int(seconds * 1000),
            "created_by": body.created_by,
            "comment": body.comment,
        }
        with engine.begin() as conn:
            conn.execute(insert(alert_silences).values(**row))
        return {**row, "matchers": body.matchers}

    @r.delete("/silences/{silence_id}", status_code=204, summary="End a silence now")
    def _unsilence(silence_id: str) -> None:
        with engine.begin() as conn:
            n = conn.execute(
                update(alert_silences)
                .where(alert_silences.c.id == silence_id)
                .values(ends_at_ms=now_ms())
            ).rowcount
        if not n:
            raise NotFound(f"no silence with id '{silence_id}'", code="silence_not_found")

    @r.get("/deliveries", summary="Recent notification deliveries (sent and failed)")
    def _deliveries(
        channel: str | None = None, limit: int = Query(50, ge=1, le=1000)
    ) -> dict[str, Any]:
        from keel.alerts.delivery import recent

        return {"data": recent(engine, limit=limit, channel=channel)}

    @r.post("/test", summary="Send a test message to a channel")
    async def _test(channel: str = Body(..., embed=True)) -> dict[str, Any]:
        if channel not in settings.channels:
            raise NotFound(
                f"no channel named '{channel}' (known: "
                f"{', '.join(sorted(settings.channels)) or 'none'})",
                code="channel_not_found",
            )
        rec = await dispatcher.send_test(channel)
        return rec if isinstance(rec, dict) else rec.__dict__

    @r.get("/signals", summary="Signals rules can watch")
    def _signals() -> dict[str, Any]:
        from keel.alerts.sources import describe_signals
        from keel.evals import signals as _eval_signals  # noqa: F401  (registers eval_*)

        return {"data": describe_signals()}

    return r
