"""PagerDuty Events API v2: one event per alert, so each gets its own incident.

``dedup_key`` is the same for the trigger and the resolve of one alert (rule +
label set), so PagerDuty appends re-sends to the open incident and a resolve
closes it. Re-sending a whole group on retry is therefore harmless.
"""

from __future__ import annotations

from typing import Any

import orjson

from keel.alerts import messages as m
from keel.alerts.model import DeliveryError, Notification
from keel.alerts.notifiers.base import HTTPDeliveryError, Notifier, register_notifier
from keel.alerts.notifiers.webhook import dedup_key

EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
SEVERITY = {"critical": "critical", "warning": "warning", "info": "info"}
_SUMMARY_MAX = 1024


def build_event(n: Notification, routing_key: str) -> dict[str, Any]:
    custom: dict[str, Any] = {k.lower().replace(" ", "_"): v for k, v in m.facts(n)}
    custom.update(
        {
            "rule": n.rule,
            "signal": n.signal,
            "labels": dict(sorted(n.labels.items())),
            "value": n.value,
            "threshold": n.threshold,
            "op": n.op,
            "mode": n.mode,
            "window_s": n.window_s,
            "since": m.iso_time(n.since_ms),
        }
    )
    summary = m.summary(n)
    event: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": "resolve" if n.kind == "resolved" else "trigger",
        "dedup_key": dedup_key(n),
        "payload": {
            "summary": summary if len(summary) <= _SUMMARY_MAX else summary[:1023] + "…",
            "severity": SEVERITY.get(n.severity, "warning"),
            "source": "keel",
            "timestamp": m.iso_time(n.ts_ms),
            "component": m.labels_text(n.labels) or n.signal,
            "group": n.rule,
            "class": n.signal,
            "custom_details": custom,
        },
        "client": "Keel",
    }
    links = m.links_of(n)
    if links:
        event["links"] = [{"href": url, "text": label} for label, url in links]
    home = n.links.get("dashboard") or n.links.get("alert")
    if home:
        event["client_url"] = home
    return event


@register_notifier
class PagerDutyNotifier(Notifier):
    kind = "pagerduty"

    async def send(self, notifications: list[Notification]) -> None:
        url = self.settings.url or EVENTS_URL
        key_var = self.settings.routing_key_env
        if not key_var:
            raise DeliveryError(f"channel '{self.name}' has no routing_key_env", retryable=False)
        routing_key = self.env(key_var, "routing key")
        errors: list[DeliveryError] = []
        # Every event is attempted even when one fails: one bad alert must not
        # hide the others from whoever is on call.
        for n in m.ordered(notifications):
            body = orjson.dumps(build_event(n, routing_key))
            try:
                await self.post(url, body, {"Content-Type": "application/json"})
            except DeliveryError as e:
                errors.append(e)
        if errors:
            first = errors[0]
            more = f" (and {len(errors) - 1} more failed)" if len(errors) > 1 else ""
            waits = [w for e in errors if (w := getattr(e, "retry_after_s", None))]
            raise HTTPDeliveryError(
                f"{len(errors)} of {len(notifications)} PagerDuty events failed: {first}{more}",
                status=getattr(first, "status", None),
                retryable=any(e.retryable for e in errors),
                retry_after_s=max(waits) if waits else None,
            )
