"""Pipelines started by the server: on a cron schedule, or when alert rules fire."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from keel.config.alerts import Duration
from keel.config.sections import _Section

_RULE_NAME = r"^[A-Za-z0-9_.:-]+$"


class PipelineTriggerSettings(_Section):
    """One pipeline the trigger daemon may start (as a ``keel pipeline run`` subprocess)."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$",
        description="The pipeline's name (the `name:` in its file).",
    )
    file: str = Field(min_length=1, description="Its pipeline.yaml (relative: to the cwd).")
    schedule: str | None = Field(
        None, description="A cron expression (UTC), e.g. '0 3 * * 1' (Mondays 03:00)."
    )
    on_alerts: list[str] = Field(
        default_factory=list, description="Alert rules whose firing starts the pipeline."
    )
    cooldown: Duration = Field(
        3600.0, ge=0, description="After an alert-triggered start, no other for this long."
    )

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from croniter import croniter

        if not croniter.is_valid(v):
            raise ValueError(f"{v!r} is not a cron expression (5 fields: min hour day month dow)")
        return v

    @field_validator("on_alerts")
    @classmethod
    def _rules(cls, v: list[str]) -> list[str]:
        import re

        for i, name in enumerate(v):
            if not re.match(_RULE_NAME, name):
                raise ValueError(f"item {i}: {name!r} is not an alert rule name")
        return v

    @model_validator(mode="after")
    def _some_trigger(self) -> PipelineTriggerSettings:
        if self.schedule is None and not self.on_alerts:
            raise ValueError("give a schedule, on_alerts, or both")
        return self


class PipelinesSettings(_Section):
    enabled: bool = Field(True, description="Run the pipeline trigger daemon (schedules, alerts).")
    interval_s: float = Field(
        15.0, gt=0, description="How often the trigger daemon checks schedules and alerts."
    )
    pipelines: list[PipelineTriggerSettings] = Field(
        default_factory=list,
        description="Pipelines started by a schedule or by firing alert rules.",
    )

    @model_validator(mode="after")
    def _unique(self) -> PipelinesSettings:
        names = [p.name for p in self.pipelines]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pipelines: duplicate name(s) {', '.join(dupes)}")
        return self
