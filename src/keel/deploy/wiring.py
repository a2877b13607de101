"""How ``create_app`` builds the deployment parts of one process."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter
from sqlalchemy.engine import Engine

from keel.config import Settings
from keel.daemon import Daemon
from keel.deploy import api
from keel.deploy.monitor import DeployMonitor
from keel.deploy.service import DeployService
from keel.deploy.serving import RouteSync, ServingPool
from keel.errors import ConfigError
from keel.gateway.providers.base import Provider
from keel.gateway.router import Router


@dataclass
class DeployParts:
    service: DeployService
    router: APIRouter
    daemons: list[Daemon] = field(default_factory=list)
    route_sync: RouteSync | None = None
    monitor: DeployMonitor | None = None


def build_deploy(
    engine: Engine,
    settings: Settings,
    environ: Mapping[str, str],
    *,
    roles: Collection[str],
    router: Router,
    providers: Mapping[str, Provider],
    registry: Any = None,
    dispatcher: Any = None,
    client_factory: Callable[[], Any] | None = None,
    dashboard_url: str | None = None,
) -> DeployParts:
    """Route sync in every gateway process; the monitor (a singleton) under ``daemons``;
    the registry's approvals start deployments; the REST router."""
    known = set(settings.alerts.channels)
    named = [("deploy.notify", settings.deploy.notify)] + [
        (f"deploy.models.{m}.notify", ms.notify) for m, ms in settings.deploy.models.items()
    ]
    for where, chans in named:
        unknown = sorted(set(chans or ()) - known)
        if unknown:
            raise ConfigError(
                f"{where}: unknown alert channel(s) {', '.join(unknown)} "
                f"(alerts.channels: {', '.join(sorted(known)) or 'none'})"
            )
    service = DeployService(engine, settings, registry)
    parts = DeployParts(service, api.make_router(service))
    if registry is not None:
        registry.on_approved.append(service.on_approved)
    if "gateway" in roles:
        pool = ServingPool(settings, providers, environ)
        parts.route_sync = RouteSync(
            service.store, router, pool, settings.deploy.route_poll_interval_s
        )
        parts.daemons.append(parts.route_sync)
    if "daemons" in roles and settings.deploy.enabled:
        parts.monitor = DeployMonitor(
            service,
            dispatcher=dispatcher,
            client_factory=client_factory,
            dashboard_url=dashboard_url,
        )
        parts.daemons.append(parts.monitor)
    return parts
