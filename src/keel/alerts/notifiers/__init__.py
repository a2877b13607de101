"""Notification channels. Importing this package registers every built-in kind."""

from keel.alerts.notifiers import email, pagerduty, slack, webhook
from keel.alerts.notifiers.base import (
    NOTIFIERS,
    HTTPDeliveryError,
    Notifier,
    SharedSession,
    build_notifiers,
    register_notifier,
)

__all__ = [
    "NOTIFIERS",
    "HTTPDeliveryError",
    "Notifier",
    "SharedSession",
    "build_notifiers",
    "email",
    "pagerduty",
    "register_notifier",
    "slack",
    "webhook",
]
