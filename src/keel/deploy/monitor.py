"""The deployment monitor: one replica advances every deployment through its states.

Each tick (``deploy.monitor_interval_s``), holding the ``deploy`` lease:

1. recent approvals without a deployment get one (see :meth:`DeployService.catch_up`);
2. ``pending_validation`` → ``validating``, and the validation runs as a task
   of this process; a ``validating`` deployment nobody here runs (its process
   died) is claimed and validated again — the eval runner resumes its run;
3. a ``canary`` is compared with its baseline over the window so far
   (:mod:`keel.deploy.compare`) and promoted or rolled back when the decision
   is due; the latest comparison is stored either way;
4. a final state nobody was told about yet gets its effects: the registry's
   ``production`` alias follows a promotion (and a rollback of one), and the
   alert channels get a notification. They are marked done only after the
   delivery was attempted, so a restart repeats them rather than skipping them.

Everything it decides goes through the compare-and-set transitions of
:class:`~keel.deploy.store.DeployStore`: a restart, a second leader after a
lease expiry, or an operator acting at the same moment cannot make a
transition happen twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from keel.daemon import INSTANCE_ID, Daemon, now_ms
from keel.deploy.model import (
    CANARY,
    CANCELLED,
    PENDING,
    PROMOTED,
    ROLLED_BACK,
    VALIDATING,
    VALIDATION_FAILED,
    Target,
    TargetError,
    ref_of,
)
from keel.deploy.notify import channels_for, notification
from keel.deploy.service import SYSTEM, DeployService, started_validation
from keel.deploy.store import KEEP, RouteChange
from keel.deploy.validate import Validation, validate
from keel.errors import KeelError

log = logging.getLogger("keel.deploy")

_MAX_VALIDATION_CRASHES = 3


class DeployMonitor(Daemon):
    name = "deploy"
    singleton = True

    def __init__(
        self,
        service: DeployService,
        *,
        dispatcher: Any = None,
        client_factory: Callable[[], Any] | None = None,
        dashboard_url: str | None = None,
    ) -> None:
        d = service.settings.deploy
        self.interval_s = d.monitor_interval_s
        self.lease_ttl_s = d.lease_ttl_s
        super().__init__(service.engine)
        self.service = service
        self.store = service.store
        self.dispatcher = dispatcher
        self.client_factory = client_factory
        self.dashboard_url = dashboard_url
        self._validations: dict[str, asyncio.Task[None]] = {}
        self._effects: dict[str, asyncio.Task[None]] = {}
        self._crashes: dict[str, int] = {}

    # -- the loop --------------------------------------------------------------------

    async def tick(self) -> None:
        await asyncio.to_thread(self.service.catch_up)
        for d in await asyncio.to_thread(self.store.active_all):
            try:
                if d["state"] == PENDING:
                    await self._begin(d)
                elif d["state"] == VALIDATING and d["id"] not in self._validations:
                    await self._resume(d)
                elif d["state"] == CANARY:
                    await self._watch(d)
            except Exception:
                log.exception(
                    "deployment %s (%s): step failed", d["id"], ref_of(d["model"], d["version"])
                )
        for d in await asyncio.to_thread(self.store.unnotified):
            if d["id"] not in self._effects:
                self._spawn(self._effects, d["id"], self._after(d))

    def _spawn(self, tasks: dict[str, asyncio.Task[None]], key: str, coro: Any) -> None:
        task = asyncio.create_task(coro, name=f"keel-deploy:{key}")
        tasks[key] = task
        task.add_done_callback(lambda _t: tasks.pop(key, None))

    async def stop(self) -> None:
        await super().stop()
        for tasks in (self._validations, self._effects):
            for t in list(tasks.values()):
                t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*tasks.values(), return_exceptions=True)

    # -- validation ------------------------------------------------------------------

    async def _begin(self, d: dict[str, Any]) -> None:
        moved = await asyncio.to_thread(started_validation, self.store, d, INSTANCE_ID)
        if moved is not None:
            self._spawn(self._validations, d["id"], self._validate(moved))

    async def _resume(self, d: dict[str, Any]) -> None:
        # Its worker is gone (a restart) or its task ended without a decision.
        claimed = await asyncio.to_thread(
            self.store.claim_validation, d["id"], INSTANCE_ID, d.get("worker")
        )
        if claimed:
            log.info(
                "deployment %s: resuming the validation of %s",
                d["id"],
                ref_of(d["model"], d["version"]),
            )
            self._spawn(self._validations, d["id"], self._validate(d))

    async def _validate(self, d: dict[str, Any]) -> None:
        try:
            await self._run_validation(d)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            n = self._crashes[d["id"]] = self._crashes.get(d["id"], 0) + 1
            log.exception(
                "deployment %s: validation crashed (%d of %d)", d["id"], n, _MAX_VALIDATION_CRASHES
            )
            if n >= _MAX_VALIDATION_CRASHES:
                await self._fail(
                    d, Validation(False, f"validation crashed: {type(e).__name__}: {e}")
                )

    async def _run_validation(self, d: dict[str, Any]) -> None:
        try:
            target = await asyncio.to_thread(self.service.target, d["model"], d["version"])
        except (TargetError, KeelError) as e:
            await self._fail(d, Validation(False, str(e)))
            return
        await asyncio.to_thread(self.store.save, d["id"], VALIDATING, target=target.to_json())
        if self.client_factory is None:
            result = Validation(False, "this process cannot call models (no gateway client)")
        else:
            result = await validate(
                self.engine,
                self.service.settings,
                target,
                self.client_factory,
                created_by=f"deploy:{d['id']}",
            )
        if not result.passed:
            await self._fail(d, result)
            return
        validation = {"passed": True, "reason": result.reason, **result.details}
        route = await asyncio.to_thread(self.store.route, d["alias"])
        serving = (
            route is not None and route.get("stable") is not None
        ) or self.service.has_static(d["alias"])
        if serving:
            out = await asyncio.to_thread(
                lambda: self.store.transition(
                    d["id"],
                    VALIDATING,
                    CANARY,
                    actor=SYSTEM,
                    reason=f"{result.reason}; canary at {d['canary_share']:.0%} of '{d['alias']}'",
                    updates={"validation": validation, "target": target.to_json()},
                    details={"target": target.describe()},
                    route=RouteChange(d["alias"], d["model"], KEEP, target, d["canary_share"]),
                )
            )
        else:
            out = await asyncio.to_thread(
                lambda: self.store.transition(
                    d["id"],
                    VALIDATING,
                    PROMOTED,
                    actor=SYSTEM,
                    reason=f"{result.reason}; first deployment of '{d['alias']}' (nothing to "
                    "compare a canary with): serving all traffic",
                    updates={"validation": validation, "target": target.to_json()},
                    details={"target": target.describe()},
                    route=RouteChange(d["alias"], d["model"], target, None, 0.0),
                )
            )
        if out is None:
            log.info("deployment %s moved on while it was validated; result dropped", d["id"])

    async def _fail(self, d: dict[str, Any], result: Validation) -> None:
        validation = {"passed": False, "reason": result.reason, **result.details}
        out = await asyncio.to_thread(
            lambda: self.store.transition(
                d["id"],
                VALIDATING,
                VALIDATION_FAILED,
                actor=SYSTEM,
                reason=result.reason,
                updates={"validation": validation},
            )
        )
        if out is not None:
            log.warning(
                "deployment %s: %s failed validation: %s",
                d["id"],
                ref_of(d["model"], d["version"]),
                result.reason,
            )

    # -- the canary ------------------------------------------------------------------

    async def _watch(self, d: dict[str, Any]) -> None:
        live = await asyncio.to_thread(self.service.live, d, now_ms())
        action = live["decision"]["action"]
        if action == "wait":
            await asyncio.to_thread(self.store.save, d["id"], CANARY, comparison=live)
            return
        reason = live["decision"]["reason"]
        if action == "promote":
            target = Target(**d["target"])
            route = RouteChange(d["alias"], d["model"], target, None, 0.0)
            to = PROMOTED
        else:
            route = RouteChange(d["alias"], d["model"], KEEP, None, 0.0)
            to = ROLLED_BACK
        out = await asyncio.to_thread(
            lambda: self.store.transition(
                d["id"],
                CANARY,
                to,
                actor=SYSTEM,
                reason=reason,
                updates={"comparison": live},
                details={"checks": live["checks"]},
                route=route,
            )
        )
        if out is not None:
            log.warning(
                "deployment %s: %s %s: %s", d["id"], ref_of(d["model"], d["version"]), to, reason
            )

    # -- effects of a final state ----------------------------------------------------

    async def _after(self, d: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(self._sync_registry, d)
        except KeelError as e:  # the registry refuses: retrying would not change that
            log.warning("deployment %s: the registry alias was not moved: %s", d["id"], e)
        except Exception:
            log.exception("deployment %s: could not update the registry aliases", d["id"])
            return  # the store is unreachable or similar: retried next tick
        n = notification(d, self.dashboard_url) if d["state"] != CANCELLED else None
        if n is not None and self.dispatcher is not None:
            known = sorted(self.dispatcher.notifiers)
            chans = channels_for(self.service.settings.deploy, d["model"], known)
            tasks = self.dispatcher.dispatch({c: [n] for c in chans})
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(self.store.mark_notified, d["id"], d["state"])

    def _sync_registry(self, d: dict[str, Any]) -> None:
        """``production`` follows the route: idempotent, so a repeat changes nothing."""
        reg = self.service.registry
        if reg is None:
            return
        model, version = d["model"], d["version"]
        if d["state"] == PROMOTED:
            reg.set_alias(model, "production", version, principal=SYSTEM, note=d.get("reason"))
        elif d["state"] == ROLLED_BACK and d.get("baseline_version") is not None:
            aliases = reg.get_model(model).get("aliases") or {}
            if aliases.get("production") == version:
                reg.set_alias(
                    model,
                    "production",
                    d["baseline_version"],
                    principal=SYSTEM,
                    note=d.get("reason"),
                )
