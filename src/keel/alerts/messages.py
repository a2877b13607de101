"""Human text for notifications: what is wrong, how bad, since when, what to look at.

Pure functions over :class:`~keel.alerts.model.Notification`; every notifier
(Slack, webhook, PagerDuty, e-mail) builds its message from these, so a person
paged at 3 a.m. reads the same words whatever the channel.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime

from keel.alerts.model import Notification

STATUS_WORD = {
    "firing": "FIRING",
    "renotify": "STILL FIRING",
    "resolved": "RESOLVED",
    "test": "TEST",
}
SEVERITY_EMOJI = {"critical": "🔴", "warning": "🟠", "info": "🔵"}
_KIND_ORDER = {"firing": 0, "renotify": 1, "resolved": 2, "test": 3}
_SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}

TEST_RULE = "keel-test"


def status_word(n: Notification) -> str:
    return STATUS_WORD.get(n.kind, n.kind.upper())


def status_emoji(n: Notification) -> str:
    if n.kind == "resolved":
        return "✅"
    if n.kind == "test":
        return "🧪"
    return SEVERITY_EMOJI.get(n.severity, "🟠")


def ordered(notifications: Iterable[Notification]) -> list[Notification]:
    """Firing before resolved, critical before warning: the worst news first."""
    return sorted(
        notifications,
        key=lambda n: (_KIND_ORDER.get(n.kind, 9), _SEVERITY_ORDER.get(n.severity, 9), n.rule),
    )


# --- numbers, durations, times ------------------------------------------------


def _num(x: float) -> str:
    """A number with about three significant digits, no scientific notation."""
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 100:
        text = f"{x:,.0f}"
    elif a >= 10:
        text = f"{x:.1f}"
    elif a >= 1:
        text = f"{x:.2f}"
    else:
        digits = min(6, 2 - math.floor(math.log10(a)))
        text = f"{x:.{digits}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def format_duration(seconds: float) -> str:
    """``45 s``, ``7 min``, ``2 h 5 min``, ``3 d 4 h``."""
    s = max(0.0, float(seconds))
    if s < 60:
        return f"{_num(round(s, 1)) if s < 10 else round(s)} s"
    minutes = round(s / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def format_value(value: float | None, unit: str = "") -> str:
    """A signal value in its unit, the way a person reads it (``12.3%``, ``1.25 s``)."""
    if value is None:
        return "no data"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    v = float(value)
    if unit == "ratio":
        return f"{_num(v * 100)}%"
    if unit == "percent":
        return f"{_num(v)}%"
    if unit == "ms":
        return f"{_num(v)} ms" if abs(v) < 1000 else f"{_num(v / 1000)} s"
    if unit == "seconds":
        return f"{_num(v)} s" if abs(v) < 60 else format_duration(v)
    if unit == "bytes":
        a = abs(v)
        for size, name in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if a >= size:
                return f"{_num(v / size)} {name}"
        return f"{v:.0f} B"
    if unit == "usd":
        sign = "-" if v < 0 else ""
        a = abs(v)
        return f"{sign}${a:,.2f}" if a >= 1 or a == 0 else f"{sign}${_num(a)}"
    if unit == "count":
        return f"{v:,.0f}" if v == int(v) else _num(v)
    if unit == "per_s":
        return f"{_num(v)}/s"
    return _num(v)


def format_time(ms: int, now_ms: int | None = None) -> str:
    """``03:12 UTC`` on the same UTC day as ``now_ms``, else ``2025-01-03 03:12 UTC``."""
    t = datetime.fromtimestamp(ms / 1000, UTC)
    if now_ms is not None and datetime.fromtimestamp(now_ms / 1000, UTC).date() == t.date():
        return t.strftime("%H:%M UTC")
    return t.strftime("%Y-%m-%d %H:%M UTC")


def iso_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


# --- pieces of a sentence -----------------------------------------------------


def labels_text(labels: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))


def alert_name(n: Notification) -> str:
    """``high-error-rate (model=gpt)``: the rule and the label set it fired for."""
    lt = labels_text(n.labels)
    return f"{n.rule} ({lt})" if lt else n.rule


def subject(n: Notification) -> str:
    """What is measured: ``error_rate of model=gpt``."""
    lt = labels_text(n.labels)
    return f"{n.signal} of {lt}" if lt else n.signal


def _signed_pct(x: float) -> str:
    return ("+" if x > 0 else "") + f"{_num(x)}%"


def _signed_value(x: float, unit: str) -> str:
    return ("+" if x > 0 else "") + format_value(x, unit)


def value_text(n: Notification) -> str:
    """The measured value as the rule sees it (a value, a % change or a change per minute)."""
    if n.value is None:
        return "no data"
    if n.mode == "change":
        return _signed_pct(n.value)
    if n.mode == "rate":
        return f"{_signed_value(n.value, n.unit)} per minute"
    return format_value(n.value, n.unit)


def condition_text(n: Notification) -> str:
    """The limit: ``above 5%``, ``above +50%``, ``above 1% per minute``."""
    if n.mode == "change":
        return f"{n.op} {_signed_pct(n.threshold)}"
    if n.mode == "rate":
        return f"{n.op} {_signed_value(n.threshold, n.unit)} per minute"
    return f"{n.op} {format_value(n.threshold, n.unit)}"


def compare_text(seconds: float | None) -> str:
    s = 86400.0 if seconds is None else seconds
    named = {3600: "an hour", 86400: "a day", 604800: "a week"}
    return f"{named.get(round(s)) or format_duration(s)} earlier"


def measured_text(n: Notification) -> str:
    """``is 12.3% (above 5%) over the last 5 min`` and its change/rate variants."""
    window = format_duration(n.window_s)
    val, cond = value_text(n), condition_text(n)
    if n.mode == "change":
        return f"is {val} vs the same {window} {compare_text(n.compare_to_s)} ({cond})"
    if n.mode == "rate":
        return f"is changing by {val} over the last {window} ({cond})"
    return f"is {val} ({cond}) over the last {window}"


def how_bad(n: Notification) -> str:
    """The value against the limit, e.g. ``12.3% — 2.5x the limit of 5%``."""
    val = value_text(n)
    if n.value is None:
        return f"no data (limit: {condition_text(n)})"
    if n.mode == "value" and n.threshold > 0 and n.value >= 0:
        factor = n.value / n.threshold
        if n.op == "above" and factor >= 1:
            return f"{val} — {factor:.1f}x the limit of {format_value(n.threshold, n.unit)}"
        if n.op == "below" and factor <= 1:
            return (
                f"{val} — {_num((1 - factor) * 100)}% under the limit of "
                f"{format_value(n.threshold, n.unit)}"
            )
    return f"{val} (limit: {condition_text(n)})"


def since_text(n: Notification) -> str:
    """When it started and how long ago; for a resolved alert, how long it lasted."""
    if n.kind == "resolved":
        return (
            f"fired {format_time(n.since_ms, n.ts_ms)}, resolved {format_time(n.ts_ms, n.ts_ms)}"
            f" (lasted {format_duration((n.ts_ms - n.since_ms) / 1000)})"
        )
    ago = format_duration((n.ts_ms - n.since_ms) / 1000)
    return f"{format_time(n.since_ms, n.ts_ms)} ({ago} ago)"


_LINK_ORDER = {"dashboard": "Dashboard", "alert": "Alert", "traces": "Traces"}


def links_of(n: Notification) -> list[tuple[str, str]]:
    """(label, URL) of what to look at: dashboard, alert, traces, runbook, then the rest."""
    out = [(label, n.links[key]) for key, label in _LINK_ORDER.items() if n.links.get(key)]
    if n.runbook_url:
        out.append(("Runbook", n.runbook_url))
    for key, url in n.links.items():
        if key not in _LINK_ORDER and url:
            out.append((key.replace("_", " ").capitalize(), url))
    return out


# --- the public formatters ----------------------------------------------------


def title(n: Notification) -> str:
    """``FIRING [critical] high-error-rate (model=gpt)``."""
    if n.kind == "test":
        return f"TEST {n.rule}: Keel test notification (nothing is wrong)"
    return f"{status_word(n)} [{n.severity}] {alert_name(n)}"


def summary(n: Notification) -> str:
    """One line: status, severity, what, how bad, since when."""
    head = f"{status_word(n)} · {n.severity} · "
    if n.kind == "test":
        return (
            head + "this is a test notification from Keel — nothing is wrong, no action needed "
            f"(sample: {subject(n)} {measured_text(n)})"
        )
    if n.kind == "resolved":
        return (
            head + f"{subject(n)} is back to {value_text(n)} (fires {condition_text(n)}) — "
            f"{since_text(n)}"
        )
    return head + f"{subject(n)} {measured_text(n)} — since {since_text(n)}"


def facts(n: Notification) -> list[tuple[str, str]]:
    """The labelled rows of a message, in reading order (details, e-mail, Slack)."""
    rows: list[tuple[str, str]] = []
    if n.kind == "test":
        rows.append(("Test", "sent by `keel alerts test`; the values below are a sample"))
    window = format_duration(n.window_s)
    if n.mode == "change":
        what = (
            f"{subject(n)} changed {condition_text(n)} vs the same {window} "
            f"{compare_text(n.compare_to_s)}"
        )
    elif n.mode == "rate":
        what = f"{subject(n)} is changing {condition_text(n)} over the last {window}"
    else:
        what = f"{subject(n)} is {condition_text(n)} over the last {window}"
    if n.kind == "resolved":
        rows.append(("What", f"{subject(n)} is back within its limit (fires {condition_text(n)})"))
        rows.append(("Now", value_text(n)))
        rows.append(("When", since_text(n)))
    else:
        rows.append(("What", what))
        rows.append(("How bad", how_bad(n)))
        rows.append(("Since", since_text(n)))
    rows.append(("Severity", n.severity))
    rows.append(("Rule", n.rule))
    if n.labels:
        rows.append(("Labels", labels_text(n.labels)))
    if n.description:
        rows.append(("About", n.description.strip()))
    for label, url in links_of(n):
        rows.append((label, url))
    return rows


def details(n: Notification) -> str:
    """Multi-line plain text: title, summary, then what / how bad / since / links."""
    rows = facts(n)
    width = max(len(k) for k, _ in rows) + 2
    lines = [title(n), "", summary(n), ""]
    for key, val in rows:
        first, *rest = val.splitlines() or [""]
        lines.append(f"{key + ':':<{width}}{first}")
        lines.extend(f"{'':<{width}}{line}" for line in rest)
    return "\n".join(lines)


def group_subject(notifications: list[Notification], max_len: int = 200) -> str:
    """``[Keel] 3 alerts firing, 1 resolved: high-error-rate (model=gpt), …``."""
    ns = ordered(notifications)
    if not ns:
        return "[Keel] no alerts"
    if len(ns) == 1:
        n = ns[0]
        text = f"[Keel] {title(n)}"
        if n.kind != "test":
            text += f": {n.signal} {value_text(n)} ({condition_text(n)})"
        return _clip(text, max_len)
    firing = sum(1 for n in ns if n.kind in ("firing", "renotify"))
    resolved = sum(1 for n in ns if n.kind == "resolved")
    tests = sum(1 for n in ns if n.kind == "test")
    parts = []
    if firing:
        parts.append(f"{firing} alert{'s' if firing != 1 else ''} firing")
    if resolved:
        parts.append(f"{resolved} resolved")
    if tests:
        parts.append(f"{tests} test{'s' if tests != 1 else ''}")
    head = f"[Keel] {', '.join(parts)}: "
    names = [alert_name(n) for n in ns]
    text = head
    for i, name in enumerate(names):
        piece = name if i == 0 else f", {name}"
        if len(text) + len(piece) > max_len - 3:
            return text + ", …" if i else _clip(text + name, max_len)
        text += piece
    return text


def headline(notifications: list[Notification]) -> str:
    """The group subject without the ``[Keel]`` prefix, for chat headers."""
    return group_subject(notifications).removeprefix("[Keel] ")


def _clip(text: str, max_len: int) -> str:
    return text if len(text) <= max_len else text[: max_len - 1].rstrip() + "…"
