"""The registry's rows in the append-only ``audit_log`` (tables.py), and reading them back.

Targets name what changed: ``registry/<model>``, ``registry/<model>/v<n>``,
``registry/<model>/alias/<alias>``. A request the auth layer refused before any
route ran is audited by it with the request path as target, so reading a
model's history also matches ``/api/registry/models/<model>/…``.
"""

from __future__ import annotations

from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from keel._ids import new_id
from keel.daemon import now_ms
from keel.registry.model import check_model_name
from keel.store.tables import audit_log


def target(model: str, version: int | None = None, alias: str | None = None) -> str:
    if alias is not None:
        return f"registry/{model}/alias/{alias}"
    return f"registry/{model}" if version is None else f"registry/{model}/v{version}"


def append(c: Connection, principal: str, action: str, what: str, details: dict) -> None:
    """One audit row, in the caller's transaction (the change and its record commit together)."""
    c.execute(
        audit_log.insert().values(
            id=new_id(),
            ts_ms=now_ms(),
            principal=principal[:200],
            action=action,
            target=what[:300],
            details=orjson.dumps(details).decode(),
            status=None,
        )
    )


def history(engine: Engine, model: str | None = None, *, limit: int = 100) -> list[dict[str, Any]]:
    """Registry changes, newest first, with the refused or failed attempts (status ≥ 400)
    the auth layer recorded on registry routes. The generic rows it writes for
    successful requests are left out: the registry's own row says more."""
    a = audit_log.c
    q = sa.select(audit_log).order_by(a.ts_ms.desc(), a.id.desc()).limit(limit)
    if model is not None:
        check_model_name(model)
        path = f"/api/registry/models/{model}"
        q = q.where(
            (a.target == target(model))
            | a.target.startswith(target(model) + "/", autoescape=True)
            | (a.target == path)
            | a.target.startswith(path + "/", autoescape=True)
        )
    else:
        q = q.where(a.target.startswith("registry/") | a.target.startswith("/api/registry/"))
    q = q.where(a.action.startswith("registry.") | (a.status >= 400))
    with engine.connect() as c:
        rows = c.execute(q).all()
    return [{**r._mapping, "details": orjson.loads(r.details) if r.details else None} for r in rows]
