"""Model aliases → deployments (provider + upstream model + default params).

An alias orders its deployments for each call by its ``strategy``:

- ``weighted``: a weighted random first choice, the others after it (so a
  retry goes elsewhere);
- ``least-busy``: fewest calls in flight first (ties broken at random);
- ``fallback``: in the configured order.

Deployments whose circuit breaker is open go last, so traffic avoids them
while any other deployment is available.

A deployment route (:mod:`keel.deploy`) replaces an alias with one that serves
a registry version (``route_version`` ``"name@3"``) and may carry a ``canary``
alias of its own: :meth:`Router.resolve` sends ``canary_share`` of the calls
there. The split happens before failover, so a call retries within the version
it was given and a failing canary cannot hide behind the stable version.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from keel.config import ModelAliasSettings, Settings
from keel.errors import ModelNotFound
from keel.gateway.providers.base import Provider
from keel.gateway.resilience import Breaker


@dataclass(eq=False)
class Deployment:
    provider: Provider
    model: str
    params: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    timeout_s: float | None = None
    breaker: Breaker = field(default_factory=Breaker)
    inflight: int = 0

    @property
    def label(self) -> str:
        return f"{self.provider.name}/{self.model}"


@dataclass
class Alias:
    name: str
    kind: str  # "chat" | "embedding"
    deployments: list[Deployment]
    strategy: str = "weighted"
    retries: int = 0
    retry_backoff_s: float = 0.2
    settings: ModelAliasSettings | None = None
    route_version: str | None = None  # registry "model@version" served (deployment routes)
    canary: Alias | None = None  # gets ``canary_share`` of the calls
    canary_share: float = 0.0
    prompt: str | None = None  # rendered for calls that send ``variables`` (deploy routes)

    def candidates(self) -> list[Deployment]:
        deps = self.deployments
        if len(deps) == 1:
            return deps
        if self.strategy == "fallback":
            order = list(deps)
        elif self.strategy == "least-busy":
            order = sorted(deps, key=lambda d: (d.inflight, random.random()))
        else:
            order = _weighted_order(deps)
        healthy = [d for d in order if not d.breaker.is_open()]
        if len(healthy) == len(order):
            return order
        # open circuits last, the one reopening soonest first among them
        tripped = sorted(
            (d for d in order if d.breaker.is_open()), key=lambda d: d.breaker.open_until
        )
        return healthy + tripped

    def pick(self) -> Deployment:
        return self.candidates()[0]


def _weighted_order(deps: list[Deployment]) -> list[Deployment]:
    # Efraimidis–Spirakis: a weighted random permutation in one pass.
    return sorted(deps, key=lambda d: -(random.random() ** (1.0 / d.weight)))


class Router:
    """Resolves the ``model`` of a request to an alias and its deployments."""

    def __init__(self, aliases: dict[str, Alias]) -> None:
        self.aliases = aliases
        #: The aliases of keel.yaml: what a name falls back to when no route overrides it.
        self.static: dict[str, Alias] = dict(aliases)
        #: ``name@VERSION`` aliases resolved so far (not listed by /v1/models).
        self.versions: dict[str, Alias] = {}
        #: Resolves an unknown ``name@VERSION`` (None: no such version).
        self.loader: Callable[[str], Awaitable[Alias | None]] | None = None

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
            cb = spec.circuit_breaker
            deps = [
                Deployment(
                    providers[d.provider],
                    d.model,
                    dict(d.params),
                    d.weight,
                    d.timeout_s,
                    Breaker(cb.failures, cb.cooldown_s),
                )
                for d in spec.deployments
            ]
            aliases[name] = Alias(
                name, spec.kind, deps, spec.strategy, spec.retries, spec.retry_backoff_s, spec
            )
        return cls(aliases)

    def resolve(self, model: str) -> Alias:
        """The alias serving this call; for a route with a canary, the side it was drawn to."""
        alias = self.aliases.get(model)
        if alias is None:
            alias = self.versions.get(model)
            if alias is None:
                raise ModelNotFound(model, list(self.aliases))
            return alias
        canary = alias.canary
        if canary is not None and random.random() < alias.canary_share:
            return canary
        return alias

    async def aresolve(self, model: str) -> Alias:
        """:meth:`resolve`, also loading a registry version named ``name@VERSION`` on first use."""
        try:
            return self.resolve(model)
        except ModelNotFound:
            if self.loader is None or "@" not in model:
                raise
            alias = await self.loader(model)
            if alias is None:
                raise
            self.versions[model] = alias
            return alias

    def names(self) -> list[str]:
        return sorted(self.aliases)
