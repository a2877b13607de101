"""Telling people: a deployment's outcome as an alert notification, through the alert channels.

The notification reuses the alert shape every notifier formats (Slack, webhook,
e-mail, PagerDuty): rule ``deploy-promoted`` / ``deploy-rolled-back`` /
``deploy-validation-failed``, labels naming the model, version and alias, the
decisive number as ``value`` against its limit, and the whole reason in
``description``.
"""

from __future__ import annotations

from typing import Any

from keel.alerts.model import Notification
from keel.config import DeploySettings
from keel.daemon import now_ms
from keel.deploy.model import PROMOTED, ROLLED_BACK, VALIDATION_FAILED

RULES = {
    PROMOTED: ("deploy-promoted", "info"),
    ROLLED_BACK: ("deploy-rolled-back", "critical"),
    VALIDATION_FAILED: ("deploy-validation-failed", "warning"),
}
_UNITS = {"error_rate": "ratio", "p95_latency": "ms", "cost_per_request": "usd"}


def channels_for(settings: DeploySettings, model: str, known: list[str]) -> list[str]:
    """The channels a model's deployment news goes to (``notify`` lists; default: all)."""
    chosen = settings.for_model(model).notify
    if chosen is None:
        chosen = settings.notify
    return list(known) if chosen is None else list(chosen)


def notification(dep: dict[str, Any], dashboard_url: str | None = None) -> Notification | None:
    """The notification for a deployment's final state (None for states nobody is told about)."""
    rule = RULES.get(dep["state"])
    if rule is None:
        return None
    name, severity = rule
    failed = ((dep.get("comparison") or {}).get("decision") or {}).get("failed") or []
    first = failed[0] if failed else None
    signal, value, threshold, unit = "deployment", None, 0.0, ""
    if first is not None:
        signal = first["check"]
        value = first.get("ratio", first.get("delta", first.get("canary")))
        threshold = float(first.get("limit") or 0.0)
        unit = _UNITS.get(signal, "") if "ratio" not in first else ""
    elif dep["state"] == VALIDATION_FAILED:
        gates = [g for g in (dep.get("validation") or {}).get("gates") or [] if not g["passed"]]
        if gates:
            signal, value, threshold = (
                f"eval:{gates[0]['metric']}",
                gates[0]["value"],
                gates[0]["threshold"],
            )
    ref = f"{dep['model']}@{dep['version']}"
    verb = {
        PROMOTED: "promoted to 100% of",
        ROLLED_BACK: "rolled back from",
        VALIDATION_FAILED: "failed validation and was not deployed to",
    }[dep["state"]]
    base = (
        f"{dep['model']}@{dep['baseline_version']}"
        if dep.get("baseline_version")
        else "the keel.yaml alias"
    )
    text = (
        f"{ref} {verb} alias '{dep['alias']}' (baseline: {base}). {dep.get('reason') or ''}".strip()
    )
    links = {}
    if dashboard_url:
        links["deployment"] = f"{dashboard_url.rstrip('/')}/api/deploy/{dep['model']}"
    now = now_ms()
    return Notification(
        rule=name,
        kind="firing",
        severity=severity,
        signal=signal,
        labels={
            "model": dep["model"],
            "version": str(dep["version"]),
            "alias": dep["alias"],
            "decision": dep["state"],
        },
        value=value,
        threshold=threshold,
        op="below" if signal.startswith(("score:", "eval:")) else "above",
        mode="value",
        window_s=max(0.0, (dep["updated_at_ms"] - dep["created_at_ms"]) / 1000),
        since_ms=dep["created_at_ms"],
        ts_ms=now,
        unit=unit,
        description=text,
        links=links,
    )
