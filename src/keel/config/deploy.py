"""Gated deployment: validation, canary split, the deployment monitor's thresholds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from keel.config.alerts import Duration
from keel.config.sections import _Section

_ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}$"


class DeployModelSettings(_Section):
    """How one registry model is deployed (overrides of the ``deploy`` defaults)."""

    alias: str | None = Field(
        None,
        pattern=_ALIAS_PATTERN,
        description="Gateway model alias the model serves (default: the model's name).",
    )
    eval_suite: str | None = Field(
        None, description="Eval suite YAML run against each approved version before it serves."
    )
    require_validation: bool | None = Field(
        None, description="Override of deploy.require_validation for this model."
    )
    canary_share: float | None = Field(
        None, gt=0, lt=1, description="Override of deploy.canary_share for this model."
    )
    window_s: Duration | None = Field(
        None, gt=0, description="Override of deploy.window_s for this model."
    )
    min_requests: int | None = Field(
        None, ge=1, description="Override of deploy.min_requests for this model."
    )
    notify: list[str] | None = Field(None, description="Override of deploy.notify for this model.")
    base_url: str | None = Field(
        None,
        description="Artifact versions: an OpenAI-compatible server (vLLM, llama.cpp…) that "
        "serves them, instead of loading a GGUF artifact in the local provider.",
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding the key for base_url."
    )
    upstream_model: str = Field(
        "{model}-v{version}",
        min_length=1,
        description="Artifact versions served at base_url: the model name that server knows "
        "({model} and {version} are filled in).",
    )

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/") if v else v


class DeploySettings(_Section):
    enabled: bool = Field(
        True, description="Deploy approved registry versions (validation, canary, monitor)."
    )
    canary_share: float = Field(
        0.1, gt=0, lt=1, description="Share of an alias' calls the canary version serves."
    )
    window_s: Duration = Field(
        600.0, gt=0, description="How long a canary is compared with production before deciding."
    )
    max_window_s: Duration = Field(
        3600.0,
        gt=0,
        description="A canary without min_requests calls per side by then is decided by "
        "on_insufficient_traffic.",
    )
    on_insufficient_traffic: Literal["rollback", "promote"] = Field(
        "rollback", description="What happens to a canary that never saw enough traffic."
    )
    min_requests: int = Field(
        50, ge=1, description="Fewest calls per side (canary, production) before a comparison."
    )
    max_error_rate_increase: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Roll back when the canary's error rate exceeds production's by more "
        "(absolute, 0.02 = 2 points).",
    )
    max_p95_ratio: float = Field(
        1.5, gt=1, description="Roll back when canary p95 latency / production p95 is above this."
    )
    min_p95_increase_ms: float = Field(
        50.0,
        ge=0,
        description="…and only when it is also this much slower (ms): a few slow calls must "
        "not roll back a fast model.",
    )
    min_score_delta: float = Field(
        -0.05,
        le=0,
        description="Roll back when an online eval score's canary mean minus production's "
        "is below this.",
    )
    min_scores: int = Field(
        10, ge=1, description="Fewest online scores per side before a score is compared."
    )
    max_cost_ratio: float = Field(
        1.5,
        gt=1,
        description="Roll back when canary cost per request / production's is above this.",
    )
    early_rollback: bool = Field(
        True,
        description="Roll back before the window ends once min_requests canary calls show an "
        "error rate over the limit.",
    )
    require_validation: bool = Field(
        True, description="A model with no eval suite fails validation (false: deploy unchecked)."
    )
    validation_timeout_s: float = Field(
        900.0, gt=0, description="A validation (eval suite run) taking longer fails."
    )
    route_poll_interval_s: float = Field(
        1.0,
        gt=0,
        le=5,
        description="How often each gateway process checks the store for route changes.",
    )
    monitor_interval_s: float = Field(
        5.0, gt=0, description="How often the deployment monitor advances deployments."
    )
    lease_ttl_s: float = Field(
        30.0,
        gt=0,
        description="Another replica takes the deployment monitor over this long after its "
        "leader dies.",
    )
    notify: list[str] | None = Field(
        None,
        description="Alert channels told about validation failures, promotions and rollbacks "
        "(default: every channel; [] for none).",
    )
    models: dict[str, DeployModelSettings] = Field(
        default_factory=dict, description="Per-model deployment settings, by registry model name."
    )

    @field_validator("models")
    @classmethod
    def _unique_aliases(cls, v: dict[str, DeployModelSettings]) -> dict[str, DeployModelSettings]:
        seen: dict[str, str] = {}
        for name, m in v.items():
            alias = m.alias or name
            if alias in seen:
                raise ValueError(
                    f"{name}.alias: alias {alias!r} is already served by model {seen[alias]!r}"
                )
            seen[alias] = name
        return v

    def for_model(self, model: str) -> DeployModelSettings:
        """The per-model settings (an empty one when the model has none)."""
        return self.models.get(model) or DeployModelSettings()

    def alias_of(self, model: str) -> str:
        return self.for_model(model).alias or model
