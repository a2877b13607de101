"""What the gateway serves from the deployment tables: routes and ``name@VERSION`` models.

Each gateway process runs a :class:`RouteSync`. Every ``deploy.route_poll_interval_s``
it reads the ``(alias, revision)`` pairs of ``deploy_routes`` (a handful of
rows) and, when any changed, rebuilds the routed aliases and swaps the router's
alias table in one assignment: a call sees the old table or the new one, never
half of each. A route overrides the keel.yaml alias of the same name; with no
route (or a route whose stable side is null) the keel.yaml alias serves.

The :class:`ServingPool` turns a :class:`~keel.deploy.model.Target` into a
gateway :class:`~keel.gateway.router.Alias` and keeps it, so breakers and
in-flight counts survive route reloads, and a version's own provider (an
OpenAI-compatible ``base_url``, or a GGUF artifact in a local provider of its
own, loaded on its first call) is created once per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from keel.config import ProviderSettings, Settings
from keel.daemon import Daemon
from keel.deploy.model import Target, TargetError, parse_ref, target_for, version_row
from keel.deploy.store import DeployStore
from keel.errors import KeelError
from keel.gateway.providers.base import Provider
from keel.gateway.resilience import Breaker
from keel.gateway.router import Alias, Deployment, Router

log = logging.getLogger("keel.deploy")

_MISS_TTL_S = 5.0


def _artifact_provider(name: str, settings: Settings, path: str) -> Provider:
    from keel.gateway.providers.local import LocalProvider

    class ArtifactLocalProvider(LocalProvider):
        """A local provider for one GGUF artifact: chat only, loaded on its first call."""

        def _load_embed(self, bundled: Any) -> str | None:
            return "an artifact deployment serves chat completions only"

    local = settings.local.model_copy(update={"enabled": True, "chat_model_path": path})
    return ArtifactLocalProvider(name, ProviderSettings(kind="local"), local=local)


class ServingPool:
    """Gateway aliases for registry versions, built once per target and kept."""

    def __init__(
        self, settings: Settings, providers: Mapping[str, Provider], environ: Mapping[str, str]
    ) -> None:
        self.settings = settings
        self.providers = providers
        self.environ = environ
        self._own: dict[str, Provider] = {}  # providers created for one version
        self._aliases: dict[tuple[str, str], Alias] = {}
        # Route reloads run in a worker thread, name@VERSION loads on the event loop.
        self._lock = threading.Lock()

    def _provider(self, t: Target) -> Provider:
        if t.served_by in ("provider", "local"):
            p = self.providers.get(t.provider or "")
            if p is None:
                raise TargetError(
                    f"{t.ref}: provider {t.provider!r} is not configured in this process"
                )
            return p
        p = self._own.get(t.ref)
        if p is not None:
            return p
        if t.served_by == "base_url":
            from keel.gateway.providers._http import make_session
            from keel.gateway.providers.openai import OpenAIProvider

            g = self.settings.gateway
            ps = ProviderSettings(kind="openai", base_url=t.base_url, api_key_env=t.api_key_env)
            key = self.environ.get(t.api_key_env) if t.api_key_env else None
            p = OpenAIProvider(
                t.ref,
                ps,
                session_factory=functools.partial(
                    make_session,
                    read_timeout_s=g.default_timeout_s,
                    connect_timeout_s=g.connect_timeout_s,
                    max_connections=g.max_connections,
                ),
                api_key=key,
            )
        elif t.served_by == "local-artifact":
            p = _artifact_provider(t.ref, self.settings, t.artifact or "")
        else:
            raise TargetError(f"{t.ref}: unknown way of serving {t.served_by!r}")
        self._own[t.ref] = p
        return p

    def alias(self, name: str, t: Target, like: Alias | None = None) -> Alias:
        """The alias ``name`` serving ``t`` (limits, cache and retries as ``like``'s)."""
        key = (name, t.to_json())
        with self._lock:
            found = self._aliases.get(key)
            if found is None:
                found = self._aliases[key] = self._build(name, t, like)
            return found

    def _build(self, name: str, t: Target, like: Alias | None) -> Alias:
        spec = like.settings if like is not None else None
        cb = spec.circuit_breaker if spec is not None else None
        dep = Deployment(
            self._provider(t),
            t.upstream_model,
            dict(t.params),
            breaker=Breaker(cb.failures, cb.cooldown_s) if cb is not None else Breaker(),
        )
        return Alias(
            name,
            like.kind if like is not None else "chat",
            [dep],
            retries=like.retries if like is not None else 1,
            retry_backoff_s=like.retry_backoff_s if like is not None else 0.2,
            settings=spec,
            route_version=t.ref,
            prompt=t.prompt,
        )

    async def aclose(self) -> None:
        for p in self._own.values():
            with contextlib.suppress(Exception):
                await p.aclose()
            with contextlib.suppress(Exception):
                await p.close_session()
        self._own.clear()


def build_route(pool: ServingPool, router: Router, route: dict[str, Any]) -> Alias | None:
    """The alias a route row stands for (None: nothing can serve it here)."""
    name = route["alias"]
    static = router.static.get(name)
    stable_t = Target(**route["stable"]) if route.get("stable") else None
    canary_t = Target(**route["canary"]) if route.get("canary") else None
    stable = pool.alias(name, stable_t, static) if stable_t is not None else static
    if stable is None:
        return None
    if canary_t is None:
        return stable
    canary = pool.alias(name, canary_t, static)
    # A copy: the pooled stable alias is shared with other route revisions.
    return dataclasses.replace(stable, canary=canary, canary_share=float(route["canary_share"]))


class RouteSync(Daemon):
    """Keeps this process's router on the routes in the store (not a singleton)."""

    name = "route-sync"
    singleton = False

    def __init__(
        self,
        store: DeployStore,
        router: Router,
        pool: ServingPool,
        interval_s: float,
    ) -> None:
        self.interval_s = interval_s
        super().__init__(store.engine)
        self.store = store
        self.router = router
        self.pool = pool
        self.seen: dict[str, int] = {}
        self.applied_at: float | None = None  # monotonic time of the last swap
        self._misses: dict[str, float] = {}
        router.loader = self.load_version

    def start(self) -> None:
        # Serve the stored routes from the first call on, not a poll later.
        try:
            self.sync()
        except Exception:
            log.exception(
                "route sync: the first load failed; retrying every %.1f s", self.interval_s
            )
        super().start()

    async def tick(self) -> None:
        await asyncio.to_thread(self.sync)

    def sync(self) -> bool:
        """Reload the routes when any revision changed; True when the router was swapped."""
        revs = self.store.revisions()
        if revs == self.seen:
            return False
        rows = self.store.routes()
        table = dict(self.router.static)
        current = self.router.aliases
        for row in rows:
            try:
                alias = build_route(self.pool, self.router, row)
            except (KeelError, TypeError, ValueError) as e:
                # Keep serving what this process served before for that name.
                log.error(
                    "route %s (revision %s) cannot be served here: %s",
                    row["alias"],
                    row["revision"],
                    e,
                )
                alias = current.get(row["alias"])
            if alias is not None:
                table[row["alias"]] = alias
        self.router.aliases = table  # one reference swap: atomic for the event loop
        self.seen = {r["alias"]: int(r["revision"]) for r in rows}
        self.applied_at = time.monotonic()
        log.info("routes reloaded: %s", ", ".join(f"{a}@r{v}" for a, v in self.seen.items()))
        return True

    async def load_version(self, ref: str) -> Alias | None:
        """``name@VERSION`` as a model: the registry version, served on its own."""
        parsed = parse_ref(ref)
        if parsed is None:
            return None
        missed = self._misses.get(ref)
        if missed is not None and time.monotonic() - missed < _MISS_TTL_S:
            return None
        model, version = parsed
        try:
            t = await asyncio.to_thread(self._target, model, version)
        except KeelError as e:
            log.info("model %s cannot be served: %s", ref, e)
            self._misses[ref] = time.monotonic()
            return None
        static = self.router.static.get(self.pool.settings.deploy.alias_of(model))
        return self.pool.alias(ref, t, static)

    def _target(self, model: str, version: int) -> Target:
        t = self.store.target_of(model, version)
        if t is not None:
            return t
        row = version_row(self.store.engine, model, version)
        if row.get("status") == "rejected":
            raise TargetError(f"{model}@{version} was rejected")
        return target_for(row, self.pool.settings)

    async def stop(self) -> None:
        await super().stop()
        await self.pool.aclose()
