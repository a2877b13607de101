"""Generic webhook: one JSON document per group, optionally signed with HMAC-SHA256.

The receiver verifies ``X-Keel-Signature: sha256=<hex>`` by computing
``hmac.new(secret, raw_body, sha256).hexdigest()`` over the exact body bytes;
the body carries ``sent_at`` (also in ``X-Keel-Timestamp``), so a receiver can
refuse replays of old signed bodies.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import orjson

from keel.alerts import messages as m
from keel.alerts.model import Notification, labels_key
from keel.alerts.notifiers.base import Notifier, register_notifier

SIGNATURE_HEADER = "X-Keel-Signature"
TIMESTAMP_HEADER = "X-Keel-Timestamp"


def alert_dict(n: Notification) -> dict[str, Any]:
    return {
        "rule": n.rule,
        "kind": n.kind,
        "severity": n.severity,
        "signal": n.signal,
        "labels": dict(sorted(n.labels.items())),
        "key": dedup_key(n),
        "value": n.value,
        "value_text": m.value_text(n),
        "threshold": n.threshold,
        "op": n.op,
        "mode": n.mode,
        "unit": n.unit,
        "window_s": n.window_s,
        "compare_to_s": n.compare_to_s,
        "since": m.iso_time(n.since_ms),
        "ts": m.iso_time(n.ts_ms),
        "summary": m.summary(n),
        "description": n.description,
        "runbook_url": n.runbook_url,
        "links": dict(n.links),
        "test": n.kind == "test",
    }


def dedup_key(n: Notification) -> str:
    """Stable across firing → renotify → resolved of one alert (rule + label set)."""
    return f"keel:{n.rule}:{labels_key(tuple(sorted(n.labels.items())))}"


def group_status(notifications: list[Notification]) -> str:
    """firing, resolved, test, or mixed."""
    kinds = {"renotify": "firing"}
    statuses = {kinds.get(n.kind, n.kind) for n in notifications}
    return statuses.pop() if len(statuses) == 1 else "mixed"


def build_body(notifications: list[Notification], sent_at_s: int) -> dict[str, Any]:
    ns = m.ordered(notifications)
    return {
        "version": 1,
        "status": group_status(ns),
        "group_subject": m.group_subject(ns),
        "sent_at": sent_at_s,
        "alerts": [alert_dict(n) for n in ns],
    }


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@register_notifier
class WebhookNotifier(Notifier):
    kind = "webhook"

    async def send(self, notifications: list[Notification]) -> None:
        url = self.url()
        # Resolve every secret before anything is sent: a missing one is a config error.
        headers = {k: self.expand(v) for k, v in self.settings.headers.items()}
        secret = (
            self.env(self.settings.secret_env, "signing secret")
            if self.settings.secret_env
            else None
        )
        sent_at = int(time.time())
        body = orjson.dumps(build_body(notifications, sent_at))
        headers["Content-Type"] = "application/json"
        headers["User-Agent"] = "keel-alerts"
        if secret is not None:
            headers[TIMESTAMP_HEADER] = str(sent_at)
            headers[SIGNATURE_HEADER] = sign(secret, body)
        await self.post(url, body, headers)
