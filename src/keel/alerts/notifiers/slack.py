"""Slack incoming webhook: one Block Kit message per group of alerts."""

from __future__ import annotations

from typing import Any

import orjson

from keel.alerts import messages as m
from keel.alerts.model import Notification
from keel.alerts.notifiers.base import Notifier, register_notifier

# Slack allows 50 blocks per message; each alert takes up to 4 (section,
# context, actions, divider) after the header, so 10 alerts stay well inside.
MAX_ALERTS = 10
_HEADER_MAX = 150
_SECTION_MAX = 3000
_FIELD_MAX = 2000
_BUTTON_TEXT_MAX = 75


def _esc(text: str) -> str:
    """Slack mrkdwn control characters (the only three Slack asks to escape)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _field(label: str, value: str) -> dict[str, str]:
    return {"type": "mrkdwn", "text": _clip(f"*{label}*\n{_esc(value)}", _FIELD_MAX)}


def alert_blocks(n: Notification, index: int) -> list[dict[str, Any]]:
    """The blocks of one alert: section with fields, context, link buttons."""
    metric = n.signal
    if n.mode == "change":
        metric += f" (change vs {m.compare_text(n.compare_to_s)})"
    elif n.mode == "rate":
        metric += " (change per minute)"
    since = m.since_text(n)
    fields = [
        _field("Metric", metric),
        _field("Value", m.value_text(n) if n.kind != "resolved" else f"{m.value_text(n)} (now)"),
        _field("Threshold", m.condition_text(n)),
        _field("Since" if n.kind != "resolved" else "Lasted", since),
        _field("Labels", m.labels_text(n.labels) or "(none)"),
        _field("Severity", n.severity),
    ]
    text = f"*{m.status_emoji(n)} {_esc(m.title(n))}*\n{_esc(m.summary(n))}"
    blocks: list[dict[str, Any]] = [
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": _clip(text, _SECTION_MAX)},
            "fields": fields,
        }
    ]
    context = []
    if n.kind == "test":
        context.append("This is a *test* sent by `keel alerts test`. Nothing is wrong.")
    if n.description:
        context.append(_esc(n.description.strip()))
    if context:
        blocks.append(
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": _clip(c, _SECTION_MAX)} for c in context],
            }
        )
    links = m.links_of(n)
    if links:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {
                            "type": "plain_text",
                            "text": _clip(f"Open {label.lower()}", _BUTTON_TEXT_MAX),
                        },
                        "url": url,
                        "action_id": f"keel-link-{index}-{j}",
                        **({"style": "primary"} if j == 0 and n.kind != "resolved" else {}),
                    }
                    for j, (label, url) in enumerate(links[:5])
                ],
            }
        )
    return blocks


def build_message(notifications: list[Notification]) -> dict[str, Any]:
    """The Block Kit payload for a group, with a plain ``text`` fallback."""
    ns = m.ordered(notifications)
    shown, hidden = ns[:MAX_ALERTS], ns[MAX_ALERTS:]
    emoji = m.status_emoji(ns[0]) if ns else ""
    blocks: list[dict[str, Any]] = [
        {
            "type": "header",
            "text": {
                "type": "plain_text",
                "text": _clip(f"{emoji} {m.headline(ns)}", _HEADER_MAX),
                "emoji": True,
            },
        }
    ]
    for i, n in enumerate(shown):
        if i:
            blocks.append({"type": "divider"})
        blocks.extend(alert_blocks(n, i))
    if hidden:
        more = ", ".join(m.alert_name(n) for n in hidden)
        blocks.append(
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": _clip(
                            f"…and {len(hidden)} more: {_esc(more)} (see the dashboard)",
                            _SECTION_MAX,
                        ),
                    }
                ],
            }
        )
    fallback = "\n".join([m.group_subject(ns), *(m.summary(n) for n in ns)])
    return {"text": _clip(fallback, 3000), "blocks": blocks}


@register_notifier
class SlackNotifier(Notifier):
    kind = "slack"

    async def send(self, notifications: list[Notification]) -> None:
        url = self.url()
        body = orjson.dumps(build_message(notifications))
        await self.post(url, body, {"Content-Type": "application/json"})
