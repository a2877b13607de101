"""Parsing what people type for a key: an expiry (a date, a time or an age) and a
budget (an amount of USD, optionally per day, week or month).

Private: import these from :mod:`keel.auth.keys`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from keel.config import parse_duration
from keel.daemon import now_ms
from keel.errors import InvalidRequest

PERIODS: tuple[str, ...] = ("day", "week", "month")

_AGE = re.compile(r"^\d+(\.\d+)?\s*[smhdw]$", re.IGNORECASE)


def parse_expires(value: str, *, at_ms: int | None = None) -> int:
    """``2027-01-01``, ``2027-01-01T12:00:00Z`` or an age from now (``30d``, ``12h``)
    → epoch milliseconds. Raises :class:`InvalidRequest` unless it is in the future."""
    now = at_ms or now_ms()
    v = value.strip()
    if _AGE.match(v):
        ms = now + int(parse_duration(v.replace(" ", "")) * 1000)
    else:
        try:
            dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidRequest(
                f"expires must be a date (2027-01-01), a time (2027-01-01T12:00:00Z) "
                f"or an age (30d, 12h); got {value!r}",
                param="expires",
            ) from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        ms = int(dt.timestamp() * 1000)
    if ms <= now:
        raise InvalidRequest(f"expires {value!r} is in the past", param="expires")
    return ms


def parse_budget(value: str) -> tuple[float, str]:
    """``50`` (per month), ``50/month``, ``10/day``, ``$200/week`` → (usd, period)."""
    amount, _, period = value.strip().lstrip("$").partition("/")
    period = period.strip().lower() or "month"
    try:
        usd = float(amount)
    except ValueError:
        usd = -1.0
    if usd <= 0 or period not in PERIODS:
        raise InvalidRequest(
            f"budget must be a positive amount of USD, optionally per day, week or month "
            f"(50, 50/month, 10/day); got {value!r}",
            param="budget_usd",
        )
    return usd, period
