"""REST under ``/api/deploy``: deployments, routes, a model's status, promote and rollback.

``POST /api/deploy/{model}/promote`` and ``/rollback`` need the approver (or
admin) role (``keel.auth.guard.RULES``); the auth layer audits them, and the
deployment's events name who acted. Reads need a read key.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from keel.deploy.model import STATES
from keel.deploy.service import DeployService
from keel.errors import InvalidRequest


class ActionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=2000, description="Why (kept in the events).")


def _who(request: Request) -> str:
    from keel.auth.keys import KeyRecord

    p = getattr(request.state, "keel_principal", None)
    if isinstance(p, KeyRecord):
        return p.id if p.id in ("admin-env", "internal") else p.principal
    client = request.client.host if request.client else "unknown"
    return f"anonymous ({client})"  # auth is off: only the address is known


def make_router(service: DeployService) -> APIRouter:
    r = APIRouter(prefix="/api/deploy", tags=["deploy"])

    @r.get("/deployments", summary="Deployments, newest first")
    async def list_deployments(
        model: str | None = Query(None, description="Only this registry model."),
        state: str | None = Query(None, description="Only this state."),
        limit: int = Query(50, ge=1, le=1000),
    ) -> dict[str, Any]:
        if state is not None and state not in STATES:
            raise InvalidRequest(
                f"unknown state {state!r} (states: {', '.join(STATES)})", param="state"
            )
        return {"data": await run_in_threadpool(service.store.list, model, state, limit)}

    @r.get("/deployments/{dep_id}", summary="One deployment with its events")
    async def get_deployment(dep_id: str) -> dict[str, Any]:
        d = await run_in_threadpool(service.store.get, dep_id)
        d["events"] = await run_in_threadpool(service.store.events, dep_id)
        return d

    @r.get("/routes", summary="The routes every gateway replica follows")
    async def routes() -> dict[str, Any]:
        return {"data": await run_in_threadpool(service.store.routes)}

    @r.get("/{model}", summary="A model's deployment: split, state, live canary comparison")
    async def status(model: str) -> dict[str, Any]:
        return await run_in_threadpool(service.status, model)

    @r.post("/{model}/promote", summary="Promote the canary to all traffic (approver role)")
    async def promote(model: str, request: Request, body: ActionIn | None = None) -> dict[str, Any]:
        reason = body.reason if body else None
        request.state.keel_audit = {
            "target": f"deploy/{model}",
            "action": "promote",
            "reason": reason,
        }
        out = await run_in_threadpool(
            lambda: service.promote(model, actor=_who(request), reason=reason)
        )
        request.state.keel_audit["version"] = out["version"]
        return out

    @r.post("/{model}/rollback", summary="Restore the previous routing now (approver role)")
    async def rollback(
        model: str, request: Request, body: ActionIn | None = None
    ) -> dict[str, Any]:
        reason = body.reason if body else None
        request.state.keel_audit = {
            "target": f"deploy/{model}",
            "action": "rollback",
            "reason": reason,
        }
        out = await run_in_threadpool(
            lambda: service.rollback(model, actor=_who(request), reason=reason)
        )
        request.state.keel_audit["version"] = out["version"]
        return out

    return r
