"""The shapes shared by the alert engine, the notifiers and the API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

NotificationKind = Literal["firing", "resolved", "renotify", "test"]
Labels = tuple[tuple[str, str], ...]  # sorted (key, value) pairs: hashable, canonical


def labels_key(labels: Labels) -> str:
    """Canonical text of a label set, e.g. ``model=gpt,provider=openai`` ('' for none)."""
    return ",".join(f"{k}={v}" for k, v in labels)


@dataclass
class Notification:
    """One alert transition worth telling a person about."""

    rule: str
    kind: NotificationKind
    severity: str  # info | warning | critical
    signal: str
    labels: dict[str, str]
    value: float | None  # the measured value (for change mode: the % change)
    threshold: float
    op: str  # above | below
    mode: str  # value | change | rate
    window_s: float
    since_ms: int  # when the condition started to hold (firing) or when it fired (resolved)
    ts_ms: int  # now
    unit: str = ""  # of the signal: ratio, ms, count, percent, bytes, usd, seconds, per_s
    description: str | None = None
    runbook_url: str | None = None
    compare_to_s: float | None = None  # change mode: how far back
    links: dict[str, str] = field(default_factory=dict)  # name → URL (dashboard, traces)


class DeliveryError(Exception):
    """A notifier could not deliver; the message says why (no secrets in it)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable
