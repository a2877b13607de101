"""What a registry version is made of: names, aliases, and a served model's deployment config."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keel.errors import InvalidRequest

KINDS = ("artifact", "deployment")
STATUSES = ("candidate", "approved", "rejected")
# Stages every team uses; any other valid name is a custom alias.
CANDIDATE, APPROVED, PRODUCTION, PREVIOUS = "candidate", "approved", "production", "previous"
STAGES = (CANDIDATE, APPROVED, PRODUCTION, PREVIOUS)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
# An alias starts with a letter, so "3" or "v3" always means a version number.
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,99}$")
_VERSION = re.compile(r"^[vV]?([0-9]{1,9})$")


def check_model_name(name: Any) -> str:
    """Same rule as dataset names: letters, digits, '.', '_' and '-' (≤200)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequest(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' (≤200, "
            "starting with a letter or digit)",
            param="model",
        )
    return name


def check_alias(alias: Any) -> str:
    if not isinstance(alias, str) or not _ALIAS.fullmatch(alias):
        raise InvalidRequest(
            f"invalid alias {alias!r}: start with a letter, then letters, digits, '.', '_' "
            "or '-' (≤100)",
            param="alias",
        )
    return alias


def parse_version(ref: Any) -> int | None:
    """``3``/``"3"``/``"v3"`` → 3; an alias name → None."""
    if isinstance(ref, int) and not isinstance(ref, bool):
        return ref
    m = _VERSION.fullmatch(str(ref).strip())
    return int(m.group(1)) if m else None


class DeploymentSpec(BaseModel):
    """A served or API model as a team ships it: which provider, which upstream model,
    which prompt version, with which parameters."""

    model_config = ConfigDict(extra="forbid")

    provider: str = Field(min_length=1, max_length=100, description="A provider in keel.yaml.")
    model: str = Field(min_length=1, max_length=200, description="The upstream model name.")
    prompt: str | None = Field(
        None, description="Prompt reference (name@3, name@label); pinned to a version."
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Request parameters: temperature, max_tokens, …"
    )


def parse_deployment(data: Any) -> DeploymentSpec:
    """A deployment config (a mapping, e.g. from deploy.yaml), or a 400 naming each bad field."""
    if not isinstance(data, dict):
        raise InvalidRequest(
            "a deployment config is a mapping with provider, model, and optionally prompt "
            "and params",
            param="deployment",
        )
    try:
        return DeploymentSpec.model_validate(data)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(root)"
            parts.append(f"deployment.{loc}: {err['msg']}")
        raise InvalidRequest(
            "invalid deployment config: " + "; ".join(parts), param="deployment"
        ) from None


def check_metrics(metrics: Any) -> dict[str, float | None]:
    """``{name: number}`` (null allowed for a metric that was NaN)."""
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise InvalidRequest("metrics must be an object of name: number", param="metrics")
    out: dict[str, float | None] = {}
    for k, v in metrics.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise InvalidRequest(f"metric '{k}' must be a number, not {v!r}", param="metrics")
        out[str(k)] = None if v is None else float(v)
    return out
