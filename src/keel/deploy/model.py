"""Deployment states, their allowed transitions, and what a registry version serves from.

A :class:`Target` is a registry version turned into something the gateway can
route to: a configured provider (or the embedded ``local`` one) with an
upstream model name and params, an OpenAI-compatible server at a ``base_url``,
or a GGUF artifact loaded by a local provider of its own. ``served_by`` records
which, and the deployment keeps the target it was validated with.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keel.config import Settings
from keel.errors import InvalidRequest, NotFound
from keel.store.tables_registry import model_versions

PENDING = "pending_validation"
VALIDATING = "validating"
CANARY = "canary"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"
VALIDATION_FAILED = "validation_failed"
CANCELLED = "cancelled"

ACTIVE = (PENDING, VALIDATING, CANARY)
FINAL = (PROMOTED, ROLLED_BACK, VALIDATION_FAILED, CANCELLED)
STATES = (*ACTIVE, *FINAL)

#: from → the states it may move to. ``promoted → rolled_back`` is a manual
#: rollback after the fact; every other final state is final.
TRANSITIONS: dict[str, frozenset[str]] = {
    PENDING: frozenset({VALIDATING, CANCELLED}),
    VALIDATING: frozenset({CANARY, PROMOTED, VALIDATION_FAILED, CANCELLED}),
    CANARY: frozenset({PROMOTED, ROLLED_BACK, CANCELLED}),
    PROMOTED: frozenset({ROLLED_BACK}),
    ROLLED_BACK: frozenset(),
    VALIDATION_FAILED: frozenset(),
    CANCELLED: frozenset(),
}

_REF = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,199})@[vV]?([0-9]{1,9})$")


def parse_ref(ref: str) -> tuple[str, int] | None:
    """``"name@3"`` or ``"name@v3"`` → ("name", 3); anything else → None."""
    m = _REF.fullmatch(ref)
    return (m.group(1), int(m.group(2))) if m else None


def ref_of(model: str, version: int) -> str:
    return f"{model}@{version}"


@dataclass(frozen=True)
class Target:
    """Where one registry version's calls go."""

    model: str  # registry model
    version: int
    served_by: str  # provider | local | local-artifact | base_url
    upstream_model: str
    provider: str | None = None  # a provider of keel.yaml ("local": the embedded one)
    params: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    artifact: str | None = None  # local path of the GGUF file

    @property
    def ref(self) -> str:
        return ref_of(self.model, self.version)

    def to_json(self) -> str:
        return orjson.dumps(asdict(self), option=orjson.OPT_SORT_KEYS).decode()

    @classmethod
    def from_json(cls, text: str | None) -> Target | None:
        if not text:
            return None
        return cls(**orjson.loads(text))

    def describe(self) -> str:
        """One line for people: ``support@3 → fake/gpt-4o-mini``."""
        where = {
            "provider": f"{self.provider}/{self.upstream_model}",
            "local": "the embedded local model",
            "local-artifact": f"local GGUF {self.artifact}",
            "base_url": f"{self.base_url} ({self.upstream_model})",
        }.get(self.served_by, self.served_by)
        return f"{self.ref} → {where}"


class TargetError(InvalidRequest):
    """A version that cannot be served as configured; the message says how to fix it."""

    code = "undeployable_version"


def _local_path(uri: str) -> Path | None:
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if "://" in uri:
        return None
    return Path(uri)


def _gguf(uri: str) -> Path | None:
    """The GGUF file an artifact URI names (a .gguf file, or a directory holding one)."""
    p = _local_path(uri)
    if p is None:
        return None
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p
    if p.is_dir():
        found = sorted(p.rglob("*.gguf"))
        if len(found) == 1:
            return found[0]
    return None


def target_for(row: dict[str, Any], settings: Settings) -> Target:
    """The serving target of a ``model_versions`` row; TargetError when it cannot be served."""
    model, version = row["model"], int(row["version"])
    spec = row.get("deployment")
    if isinstance(spec, str):
        spec = orjson.loads(spec)
    providers = set(settings.providers) | ({"local"} if settings.local.enabled else set())
    if row.get("kind") == "deployment" or (spec and not row.get("artifact_uri")):
        spec = spec or {}
        provider = spec.get("provider")
        if provider not in providers:
            have = ", ".join(sorted(providers)) or "none"
            raise TargetError(
                f"{ref_of(model, version)}: its deployment names provider {provider!r}, which "
                f"is not configured here (providers: {have})"
            )
        return Target(
            model=model,
            version=version,
            served_by="local" if provider == "local" else "provider",
            provider=provider,
            upstream_model=str(spec.get("model") or model),
            params=dict(spec.get("params") or {}),
            prompt=spec.get("prompt"),
        )
    uri = row.get("artifact_uri")
    if not uri:
        raise TargetError(
            f"{ref_of(model, version)} has neither a deployment config nor an artifact"
        )
    ms = settings.deploy.for_model(model)
    if ms.base_url:
        return Target(
            model=model,
            version=version,
            served_by="base_url",
            upstream_model=ms.upstream_model.format(model=model, version=version),
            base_url=ms.base_url,
            api_key_env=ms.api_key_env,
            artifact=uri,
        )
    gguf = _gguf(uri)
    if gguf is None:
        raise TargetError(
            f"{ref_of(model, version)}: the artifact {uri} is not a GGUF file the local provider "
            f"can load; point deploy.models.{model}.base_url at a server that serves it"
        )
    return Target(
        model=model,
        version=version,
        served_by="local-artifact",
        provider="local",
        upstream_model="local",
        artifact=str(gguf),
    )


def version_row(engine: Engine, model: str, version: int) -> dict[str, Any]:
    """A registry version as a dict; NotFound when there is none."""
    mv = model_versions
    with engine.connect() as c:
        r = c.execute(
            sa.select(mv).where((mv.c.model == model) & (mv.c.version == version))
        ).first()
    if r is None:
        raise NotFound(f"the registry has no version {version} of model '{model}'", param="model")
    return dict(r._mapping)
