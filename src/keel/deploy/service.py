"""Deployments as operations: start one on approval, promote or roll back by hand, report.

The registry calls :meth:`DeployService.on_approved` after it commits an
approval; the monitor (:mod:`keel.deploy.monitor`) also catches up on recent
approvals that have no deployment (a crash between the two commits), so an
approval is never left without one. Who may promote or roll back is decided by
the auth rules in front of the API; this service records who did.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from keel.config import Settings
from keel.daemon import now_ms
from keel.deploy import compare
from keel.deploy.model import (
    CANARY,
    CANCELLED,
    PENDING,
    PROMOTED,
    ROLLED_BACK,
    VALIDATING,
    Target,
    ref_of,
    target_for,
    version_row,
)
from keel.deploy.store import KEEP, DeployStore, RouteChange
from keel.errors import Conflict, NotFound
from keel.store.tables_registry import approvals, model_versions

log = logging.getLogger("keel.deploy")

SYSTEM = "deploy-monitor"


class DeployService:
    """The deployment operations over one store (thread-safe; blocking: call off the loop)."""

    def __init__(self, engine: Engine, settings: Settings, registry: Any = None) -> None:
        self.engine = engine
        self.settings = settings
        self.store = DeployStore(engine)
        self.registry = registry  # keel.registry.RegistryService, for the production alias

    # -- starting --------------------------------------------------------------------

    def eligible(self, model: str, kind: str | None) -> bool:
        """Approved versions deploy when the model has deploy settings or is a deployment config."""
        d = self.settings.deploy
        return d.enabled and (model in d.models or kind == "deployment")

    def on_approved(self, version: dict[str, Any]) -> None:
        """The registry's hook: a deployment in ``pending_validation`` for an approved version."""
        model, number = version["model"], int(version["version"])
        if not self.eligible(model, version.get("kind")):
            log.info(
                "%s approved; not deployed (no deploy.models.%s settings)",
                ref_of(model, number),
                model,
            )
            return
        decisions = version.get("decisions") or []
        actor = decisions[-1]["principal"] if decisions else "registry"
        self.start(model, number, actor=actor)

    def start(self, model: str, version: int, *, actor: str) -> dict[str, Any]:
        ms = self.settings.deploy.for_model(model)
        share = ms.canary_share or self.settings.deploy.canary_share
        for attempt in range(3):
            try:
                dep = self.store.create(
                    model=model,
                    version=version,
                    alias=self.settings.deploy.alias_of(model),
                    canary_share=share,
                    actor=actor,
                )
                log.info(
                    "deployment %s of %s started by %s", dep["id"], ref_of(model, version), actor
                )
                return dep
            except (IntegrityError, Conflict):
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def catch_up(self, lookback_s: float = 3600.0) -> int:
        """Start deployments for recent approvals that have none; returns how many."""
        if not self.settings.deploy.enabled:
            return 0
        a, mv = approvals.c, model_versions.c
        q = (
            sa.select(a.model, a.version, a.principal, a.ts_ms, mv.kind)
            .select_from(
                approvals.join(model_versions, (mv.model == a.model) & (mv.version == a.version))
            )
            .where((a.decision == "approve") & (a.ts_ms >= now_ms() - int(lookback_s * 1000)))
            .order_by(a.ts_ms)
        )
        with self.engine.connect() as c:
            rows = c.execute(q).all()
        latest = {r.model: r for r in rows}  # ordered by time: the last approval per model wins
        started = 0
        for model, version, principal, ts, kind in latest.values():
            if not self.eligible(model, kind) or self.store.has_deployment(model, version):
                continue
            newer = [d for d in self.store.list(model, limit=1) if d["created_at_ms"] >= ts]
            if newer:  # deployed since, by other means
                continue
            log.warning(
                "%s was approved without a deployment; starting it now", ref_of(model, version)
            )
            self.start(model, version, actor=principal)
            started += 1
        return started

    # -- what routes a transition writes ---------------------------------------------

    def has_static(self, alias: str) -> bool:
        return alias in self.settings.models or (
            self.settings.local.enabled and alias in ("local", "local-embed")
        )

    def target(self, model: str, version: int) -> Target:
        """How a version is served: as last deployed, else from its registry row."""
        t = self.store.target_of(model, version)
        return (
            t
            if t is not None
            else target_for(version_row(self.engine, model, version), self.settings)
        )

    # -- by hand ---------------------------------------------------------------------

    def promote(self, model: str, *, actor: str, reason: str | None = None) -> dict[str, Any]:
        """Send all of the alias' traffic to the canary now (the monitor would have, later)."""
        d = self.store.active(model)
        if d is None:
            raise NotFound(f"model '{model}' has no active deployment to promote", param="model")
        if d["state"] != CANARY:
            raise Conflict(
                f"{ref_of(model, d['version'])} is {d['state']}; only a canary can be promoted "
                "(wait for validation to pass)",
                param="model",
            )
        target = Target(**d["target"])
        why = f"promoted by {actor}" + (f": {reason}" if reason else "")
        out = self.store.transition(
            d["id"],
            CANARY,
            PROMOTED,
            actor=actor,
            reason=why,
            route=RouteChange(d["alias"], model, target, None, 0.0),
        )
        if out is None:
            raise Conflict(f"{ref_of(model, d['version'])} changed state meanwhile; look again")
        return out

    def rollback(self, model: str, *, actor: str, reason: str | None = None) -> dict[str, Any]:
        """Restore the previous version's routing at once.

        An active canary loses its share; a deployment still validating is
        cancelled; with nothing active, the latest promotion is undone (the
        route's stable side goes back to its baseline).
        """
        why = f"rolled back by {actor}" + (f": {reason}" if reason else "")
        d = self.store.active(model)
        if d is not None:
            state = d["state"]
            to = ROLLED_BACK if state == CANARY else CANCELLED
            route = RouteChange(d["alias"], model, KEEP, None, 0.0) if state == CANARY else None
            out = self.store.transition(d["id"], state, to, actor=actor, reason=why, route=route)
            if out is None:
                raise Conflict(f"{ref_of(model, d['version'])} changed state meanwhile; look again")
            return out
        p = self.store.latest_promoted(model)
        if p is None:
            raise NotFound(f"model '{model}' has no deployment to roll back", param="model")
        route = self.store.route(p["alias"]) or {}
        stable = route.get("stable") or {}
        if stable.get("model") != model or stable.get("version") != p["version"]:
            raise Conflict(
                f"the alias '{p['alias']}' no longer serves {ref_of(model, p['version'])}; "
                "nothing to roll back",
                param="model",
            )
        base = p.get("baseline_version")
        if base is None and not self.has_static(p["alias"]):
            raise Conflict(
                f"{ref_of(model, p['version'])} was the first version deployed to "
                f"'{p['alias']}': there is no previous version to roll back to",
                param="model",
            )
        back = self.target(model, base) if base is not None else None
        out = self.store.transition(
            p["id"],
            PROMOTED,
            ROLLED_BACK,
            actor=actor,
            reason=why,
            route=RouteChange(p["alias"], model, back, None, 0.0),
        )
        if out is None:
            raise Conflict(f"{ref_of(model, p['version'])} changed state meanwhile; look again")
        return out

    # -- reporting -------------------------------------------------------------------

    def status(self, model: str) -> dict[str, Any]:
        """The model's alias, route split, active (or latest) deployment and live comparison."""
        alias = self.settings.deploy.alias_of(model)
        active = self.store.active(model)
        recent = self.store.list(model, limit=1)
        if active is None and not recent and self.store.route(alias) is None:
            raise NotFound(f"model '{model}' has never been deployed", param="model")
        route = self.store.route(alias)
        split = None
        if route is not None:
            stable, canary = route.get("stable"), route.get("canary")
            split = {
                "stable": ref_of(stable["model"], stable["version"]) if stable else "static",
                "canary": ref_of(canary["model"], canary["version"]) if canary else None,
                "canary_share": route["canary_share"] if canary else 0.0,
                "revision": route["revision"],
            }
        live = None
        if active is not None and active["state"] == CANARY:
            live = self.live(active)
        current = active or (recent[0] if recent else None)
        return {
            "model": model,
            "alias": alias,
            "route": route,
            "split": split,
            "deployment": current,
            "active": active is not None,
            "live": live,
            "events": self.store.events(current["id"]) if current else [],
        }

    def limits(self) -> compare.Limits:
        d = self.settings.deploy
        return compare.Limits(
            min_requests=d.min_requests,
            max_error_rate_increase=d.max_error_rate_increase,
            max_p95_ratio=d.max_p95_ratio,
            min_p95_increase_ms=d.min_p95_increase_ms,
            max_cost_ratio=d.max_cost_ratio,
            min_score_delta=d.min_score_delta,
            min_scores=d.min_scores,
        )

    def live(self, d: dict[str, Any], now: int | None = None) -> dict[str, Any]:
        """Canary vs baseline since the canary started, and what the monitor would decide."""
        now = now if now is not None else now_ms()
        deploy, ms = self.settings.deploy, self.settings.deploy.for_model(d["model"])
        lim = self.limits()
        if ms.min_requests:
            lim.min_requests = ms.min_requests
        window = ms.window_s or deploy.window_s
        since = d["state_since_ms"]
        base_ref = ref_of(d["model"], d["baseline_version"]) if d.get("baseline_version") else None
        canary = compare.measure(
            self.engine, d["alias"], ref_of(d["model"], d["version"]), since, now + 1
        )
        base = compare.measure(self.engine, d["alias"], base_ref, since, now + 1)
        elapsed = (now - since) / 1000
        dec = compare.decide(
            canary,
            base,
            lim,
            elapsed_s=elapsed,
            window_s=window,
            max_window_s=max(deploy.max_window_s, window),
            on_insufficient=deploy.on_insufficient_traffic,
            early_rollback=deploy.early_rollback,
        )
        return {
            "canary": canary.as_dict(),
            "baseline": base.as_dict(),
            "checks": compare.checks(canary, base, lim),
            "elapsed_s": elapsed,
            "window_s": window,
            "decision": {"action": dec.action, "reason": dec.reason, "failed": dec.failed},
            "ts_ms": now,
        }


def started_validation(store: DeployStore, d: dict[str, Any], worker: str) -> dict[str, Any] | None:
    """pending_validation → validating, owned by ``worker`` (None when someone else moved it)."""
    return store.transition(
        d["id"],
        PENDING,
        VALIDATING,
        actor=SYSTEM,
        reason=f"validating {ref_of(d['model'], d['version'])}",
        updates={"worker": worker},
    )
