"""REST: virtual keys (admin) and the audit log."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.engine import Engine

from keel.auth.keys import KeyRecord, KeyStore, parse_expires
from keel.store.tables import audit_log

SHOWN_ONCE = "Store this key now: Keel keeps only its hash and will not show it again."


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="Who or what uses the key.")
    role: Literal["admin", "approver", "read", "user"] = Field(
        "user",
        description="user: the gateway only; read: also GET /api/* and /metrics; "
        "approver: also approve model versions; admin: everything.",
    )
    budget_usd: float | None = Field(None, gt=0, description="Spend allowed per period (USD).")
    budget_period: Literal["day", "week", "month"] = Field("month", description="Budget period.")
    rpm: int | None = Field(None, ge=1, description="Requests per minute.")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute.")
    models: list[str] | None = Field(None, description="Allowed model aliases (default: all).")
    expires: str | None = Field(
        None, description="2027-01-01, 2027-01-01T12:00:00Z, or an age from now: 30d, 12h."
    )


class KeyOut(BaseModel):
    id: str
    name: str
    prefix: str = Field(description="The first characters of the secret, for recognising it.")
    role: str
    budget_usd: float | None
    budget_period: str | None
    rpm: int | None
    tpm: int | None
    models: list[str] | None
    expires_at_ms: int | None
    revoked_at_ms: int | None
    created_at_ms: int | None
    created_by: str | None


class KeyCreated(KeyOut):
    secret: str = Field(description="The key itself. Shown this once only.")
    warning: str = SHOWN_ONCE


class KeyList(BaseModel):
    data: list[KeyOut]


class AuditRow(BaseModel):
    id: str
    ts_ms: int
    principal: str
    action: str
    target: str | None
    details: dict[str, Any] | None
    status: int | None


class AuditList(BaseModel):
    data: list[AuditRow]


def _principal(request: Request) -> str | None:
    p = getattr(request.state, "keel_principal", None)
    if isinstance(p, KeyRecord):
        return "admin-env" if p.id == "admin-env" else p.principal
    return None


def list_audit(engine: Engine, *, limit: int = 100, since_ms: int | None = None) -> list[dict]:
    """Audit rows, newest first."""
    q = select(audit_log).order_by(audit_log.c.ts_ms.desc(), audit_log.c.id.desc()).limit(limit)
    if since_ms is not None:
        q = q.where(audit_log.c.ts_ms >= since_ms)
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    return [{**r._mapping, "details": orjson.loads(r.details) if r.details else None} for r in rows]


def make_router(keystore: KeyStore, engine: Engine) -> APIRouter:
    r = APIRouter(prefix="/api", tags=["keys"])

    @r.get("/keys", response_model=KeyList, summary="Virtual keys (never their secrets)")
    def _list() -> dict[str, Any]:
        return {"data": [k.to_dict() for k in keystore.list()]}

    @r.post(
        "/keys",
        response_model=KeyCreated,
        status_code=201,
        summary="Create a key; the secret is in this answer only",
    )
    async def _create(body: KeyIn, request: Request) -> dict[str, Any]:
        expires = parse_expires(body.expires) if body.expires else None
        rec, secret = await asyncio.to_thread(
            keystore.create,
            body.name,
            role=body.role,
            budget_usd=body.budget_usd,
            budget_period=body.budget_period,
            rpm=body.rpm,
            tpm=body.tpm,
            models=body.models,
            expires_at_ms=expires,
            created_by=_principal(request),
        )
        request.state.keel_audit = {"target": rec.id, "name": rec.name, "role": rec.role}
        return {**rec.to_dict(), "secret": secret, "warning": SHOWN_ONCE}

    @r.delete("/keys/{key_id}", response_model=KeyOut, summary="Revoke a key, on every replica")
    async def _revoke(key_id: str, request: Request) -> dict[str, Any]:
        rec = await asyncio.to_thread(keystore.revoke, key_id)
        request.state.keel_audit = {"target": rec.id, "name": rec.name}
        return rec.to_dict()

    @r.get("/audit", response_model=AuditList, summary="Audit log of admin actions, newest first")
    def _audit(
        limit: int = Query(100, ge=1, le=1000),
        since: str | None = Query(None, description="ISO 8601, epoch ms, or an age: 15m, 7d."),
    ) -> dict[str, Any]:
        from keel.tracing.api import parse_time

        return {"data": list_audit(engine, limit=limit, since_ms=parse_time(since, "since"))}

    return r
