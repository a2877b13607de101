"""Model aliases → deployments (provider + upstream model + default params)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from keel.config import Settings
from keel.errors import ModelNotFound
from keel.gateway.providers.base import Provider


@dataclass(frozen=True)
class Deployment:
    provider: Provider
    model: str
    params: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0


@dataclass
class Alias:
    name: str
    kind: str  # "chat" | "embedding"
    deployments: list[Deployment]
    _weights: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._weights = [d.weight for d in self.deployments]

    def pick(self) -> Deployment:
        if len(self.deployments) == 1:
            return self.deployments[0]
        return random.choices(self.deployments, weights=self._weights, k=1)[0]


class Router:
    """Resolves the ``model`` of a request to a deployment."""

    def __init__(self, aliases: dict[str, Alias]) -> None:
        self.aliases = aliases

    @classmethod
    def from_settings(cls, settings: Settings, providers: dict[str, Provider]) -> Router:
        aliases: dict[str, Alias] = {}
        if settings.local.enabled and "local" in providers:
            local = providers["local"]
            aliases["local"] = Alias("local", "chat", [Deployment(local, "local")])
            aliases["local-embed"] = Alias(
                "local-embed", "embedding", [Deployment(local, "local-embed")]
            )
        for name, spec in settings.models.items():
            deps = [
                Deployment(providers[d.provider], d.model, dict(d.params), d.weight)
                for d in spec.deployments
            ]
            aliases[name] = Alias(name, spec.kind, deps)
        return cls(aliases)

    def resolve(self, model: str) -> Alias:
        alias = self.aliases.get(model)
        if alias is None:
            raise ModelNotFound(model, list(self.aliases))
        return alias

    def names(self) -> list[str]:
        return sorted(self.aliases)
