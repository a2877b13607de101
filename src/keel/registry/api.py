"""REST under ``/api/registry``: models, versions, approvals, aliases and their audit trail.

Who may do what is decided by the auth rules in front of the app
(``keel.auth.guard.RULES``): approve/reject need the approver (or admin) role,
other changes admin, reads a read key. A refused attempt is written to the
audit log by that layer; every change made here writes its own audit row.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from keel.registry.audit import history, target
from keel.registry.model import check_alias, check_model_name, parse_version
from keel.registry.service import RegistryService
from keel.runs.api import principal_of


class RegisterIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: str | None = Field(None, description="The run the version comes from.")
    artifact: str | None = Field(
        None, description="The run's artifact (a file or directory) that is the model."
    )
    deployment: dict[str, Any] | None = Field(
        None, description="Or a served/API model: {provider, model, prompt, params}."
    )
    metrics: dict[str, Any] | None = Field(
        None, description="Metrics to record (added to the run's final metrics)."
    )
    card: str | None = Field(None, description="Model card, Markdown.")
    description: str | None = Field(None, max_length=2000)


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str | None = Field(None, max_length=10_000, description="Why (required to reject).")


class AliasIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | str = Field(description="A version number (3, v3) or another alias.")
    note: str | None = Field(None, max_length=10_000, description="Why.")


def _who(request: Request) -> str:
    p = principal_of(request)
    if p is not None:
        return p
    client = request.client.host if request.client else "unknown"
    return f"anonymous ({client})"  # auth is off: only the address is known


def _mark(request: Request, what: str, **details: Any) -> None:
    """What the auth layer's own audit row of this request names (and adds)."""
    request.state.keel_audit = {"target": what, **{k: v for k, v in details.items() if v}}


def make_router(service: RegistryService) -> APIRouter:
    r = APIRouter(prefix="/api/registry", tags=["registry"])

    @r.get("/models", summary="Models with their latest version and aliases")
    async def list_models() -> dict[str, Any]:
        return {"data": await run_in_threadpool(service.list_models)}

    @r.get("/models/{name}", summary="A model: aliases and versions, newest first")
    async def get_model(name: str) -> dict[str, Any]:
        return await run_in_threadpool(service.get_model, name)

    @r.get(
        "/models/{name}/versions/{version}",
        summary="One version (a number, or an alias such as production) with its card",
    )
    async def get_version(name: str, version: str) -> dict[str, Any]:
        return await run_in_threadpool(service.get_version, name, version)

    @r.post("/models/{name}/versions", status_code=201, summary="Register a new version")
    async def register(name: str, body: RegisterIn, request: Request) -> dict[str, Any]:
        _mark(request, target(name))
        check_model_name(name)
        return await run_in_threadpool(
            lambda: service.register(name, principal=_who(request), **body.model_dump())
        )

    def _version_target(name: str, version: str) -> str:
        v = parse_version(version)
        return target(name, v) if v is not None else target(name) + f"/{version}"

    @r.post("/models/{name}/versions/{version}/approve", summary="Approve (approver role)")
    async def approve(
        name: str, version: str, request: Request, body: DecisionIn | None = None
    ) -> dict[str, Any]:
        note = body.note if body else None
        _mark(request, _version_target(name, version), note=note)
        return await run_in_threadpool(
            lambda: service.approve(name, version, principal=_who(request), note=note)
        )

    @r.post("/models/{name}/versions/{version}/reject", summary="Reject (approver role)")
    async def reject(name: str, version: str, body: DecisionIn, request: Request) -> dict[str, Any]:
        _mark(request, _version_target(name, version), note=body.note)
        return await run_in_threadpool(
            lambda: service.reject(name, version, principal=_who(request), note=body.note or "")
        )

    @r.put("/models/{name}/aliases/{alias}", summary="Point an alias/stage at a version")
    async def set_alias(name: str, alias: str, body: AliasIn, request: Request) -> dict:
        _mark(request, target(name, alias=alias), note=body.note)
        check_alias(alias)
        return await run_in_threadpool(
            lambda: service.set_alias(
                name, alias, body.version, principal=_who(request), note=body.note
            )
        )

    @r.delete("/models/{name}/aliases/{alias}", summary="Remove an alias")
    async def delete_alias(
        name: str, alias: str, request: Request, note: str | None = Query(None)
    ) -> dict[str, Any]:
        _mark(request, target(name, alias=alias), note=note)
        return await run_in_threadpool(
            lambda: service.delete_alias(name, alias, principal=_who(request), note=note)
        )

    @r.get("/audit", summary="Registry changes and refused attempts, newest first")
    async def audit(
        model: str | None = Query(None, description="Only this model."),
        limit: int = Query(100, ge=1, le=1000),
    ) -> dict[str, Any]:
        return {
            "data": await run_in_threadpool(lambda: history(service.engine, model, limit=limit))
        }

    return r
