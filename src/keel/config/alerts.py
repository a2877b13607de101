"""Alerting settings: durations, channels, conditions and rules."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, model_validator

from keel.config.sections import _Section

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(v: Any) -> float:
    """``30s``, ``5m``, ``2h``, ``1d``, ``1w`` or a number of seconds → seconds."""
    if isinstance(v, bool):
        raise ValueError("a duration is a number of seconds or a string like 30s, 5m, 2h, 1d")
    if isinstance(v, int | float):
        seconds = float(v)
    elif isinstance(v, str) and v.strip():
        t = v.strip().lower()
        unit = _DURATION_UNITS.get(t[-1])
        try:
            seconds = float(t[:-1]) * unit if unit else float(t)
        except ValueError:
            raise ValueError(
                f"{v!r} is not a duration (use a number of seconds or 30s, 5m, 2h, 1d, 1w)"
            ) from None
    else:
        raise ValueError("a duration is a number of seconds or a string like 30s, 5m, 2h, 1d")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]

ChannelKind = Literal["slack", "webhook", "email", "pagerduty"]


class ChannelSettings(_Section):
    """Where alert notifications go. Secrets are named by environment variable."""

    kind: ChannelKind = Field(description="slack, webhook, email or pagerduty.")
    url: str | None = Field(None, description="slack/webhook/pagerduty: the URL to POST to.")
    url_env: str | None = Field(
        None, description="…or the environment variable holding it (Slack webhook URLs are secret)."
    )
    secret_env: str | None = Field(
        None, description="webhook: env var with an HMAC-SHA256 key; signs X-Keel-Signature."
    )
    routing_key_env: str | None = Field(
        None, description="pagerduty: env var with the routing key."
    )
    headers: dict[str, str] = Field(default_factory=dict, description="webhook: extra headers.")
    smtp_host: str | None = Field(None, description="email: SMTP server.")
    smtp_port: int = Field(587, ge=1, le=65535, description="email: SMTP port.")
    starttls: bool = Field(True, description="email: upgrade with STARTTLS.")
    ssl: bool = Field(False, description="email: implicit TLS (port 465).")
    username: str | None = Field(None, description="email: SMTP user.")
    password_env: str | None = Field(None, description="email: env var with the SMTP password.")
    sender: str | None = Field(None, description="email: From address.")
    to: list[str] = Field(default_factory=list, description="email: recipients.")
    timeout_s: float = Field(10.0, gt=0, description="Timeout of one delivery attempt.")

    @model_validator(mode="after")
    def _needs(self) -> ChannelSettings:
        if self.kind in ("slack", "webhook") and not (self.url or self.url_env):
            raise ValueError(f"a {self.kind} channel needs url or url_env")
        if self.kind == "pagerduty" and not self.routing_key_env:
            raise ValueError("a pagerduty channel needs routing_key_env")
        if self.kind == "email":
            if not self.smtp_host or not self.sender or not self.to:
                raise ValueError("an email channel needs smtp_host, sender and to")
            if self.ssl and self.starttls:
                raise ValueError("choose ssl (implicit TLS) or starttls, not both")
        for url in (self.url,):
            if url is not None and not url.startswith(("http://", "https://")):
                raise ValueError("url must start with http:// or https://")
        return self


class ConditionSettings(_Section):
    """When a signal's value is a problem."""

    op: Literal["above", "below"] = Field(description="Fire when the value is above/below.")
    threshold: float = Field(description="The limit (for change: a percentage).")
    mode: Literal["value", "change", "rate"] = Field(
        "value",
        description="value: the signal itself; change: % change against the same window "
        "`compare_to` earlier; rate: change per minute against the previous window.",
    )
    compare_to: Duration = Field(
        86400.0, gt=0, description="change: how far back the comparison window is (1d, 7d)."
    )


class RuleSettings(_Section):
    name: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Unique name (letters, digits, _ . : -).",
    )
    signal: str = Field(description="A registered signal (`keel alerts signals` lists them).")
    condition: ConditionSettings
    window: Duration = Field(300.0, gt=0, description="The window the signal is computed over.")
    for_: Duration = Field(
        0.0, alias="for", description="How long the condition must hold before firing."
    )
    severity: Literal["info", "warning", "critical"] = Field("warning", description="Severity.")
    channels: list[str] = Field(default_factory=list, description="Channel names to notify.")
    filters: dict[str, str] = Field(
        default_factory=dict, description="Only this model/provider/feature/user/component…"
    )
    group_by: list[str] = Field(
        default_factory=list, description="One alert per value of these labels (e.g. [model])."
    )
    description: str | None = Field(None, description="What this means and what to do.")
    runbook_url: str | None = Field(None, description="A link for whoever is paged.")
    enabled: bool = Field(True, description="Evaluate this rule.")

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class AlertsSettings(_Section):
    evaluation_interval_s: float = Field(15.0, gt=0, description="How often rules are evaluated.")
    renotify_interval_s: float = Field(
        4 * 3600.0, gt=0, description="Re-send a still-firing alert this often."
    )
    dashboard_url: str | None = Field(
        None, description="Public base URL of Keel, for links in messages (default: host:port)."
    )
    delivery_attempts: int = Field(4, ge=1, le=20, description="Tries per notification.")
    delivery_backoff_s: float = Field(
        2.0, gt=0, description="First retry delay; doubles each attempt."
    )
    channels: dict[str, ChannelSettings] = Field(
        default_factory=dict, description="Notification channels, by name."
    )
    rules: list[RuleSettings] = Field(default_factory=list, description="Alert rules.")

    @model_validator(mode="after")
    def _refs(self) -> AlertsSettings:
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"alerts.rules: duplicate rule name(s) {', '.join(dupes)}")
        for i, r in enumerate(self.rules):
            for ch in r.channels:
                if ch not in self.channels:
                    raise ValueError(
                        f"alerts.rules.{i} ({r.name}).channels: unknown channel '{ch}' "
                        f"(known: {', '.join(sorted(self.channels)) or 'none'})"
                    )
        return self
