"""REST: ``GET /api/components`` (status and 24 h uptime) and ``GET /api/components/{name}``.

Everything is read from the store, so every replica answers the same, not only
the one whose :class:`~keel.monitoring.probes.ProbeDaemon` holds the lease. The
daemon only supplies the list of configured components (with the provider
auto-probes); without one, the components checked in the last 24 h are listed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import case, func, select
from sqlalchemy.engine import Connection, Engine

from keel.daemon import now_ms
from keel.errors import NotFound
from keel.store.tables import component_checks as cc

if TYPE_CHECKING:
    from keel.monitoring.probes import ProbeDaemon

DAY_MS = 24 * 3600 * 1000
HISTORY = 100


class ComponentCheck(BaseModel):
    ts: datetime = Field(description="When the probe ran (UTC).")
    up: bool
    latency_ms: float | None = None
    error: str | None = None


class ComponentStatus(BaseModel):
    name: str = Field(description="Configured name; gateway providers are `provider:<name>`.")
    kind: str = Field(description="Probe type (providers: the provider kind).")
    up: bool | None = Field(None, description="Result of the last probe; null if never probed.")
    last_checked: datetime | None = Field(None, description="When the last probe ran (UTC).")
    latency_ms: float | None = Field(None, description="Duration of the last probe.")
    error: str | None = Field(None, description="Why the last probe failed.")
    uptime_24h: float | None = Field(
        None, description="Fraction of the last 24 h's probes that succeeded; null if none."
    )
    checks_24h: int = Field(0, description="Probes in the last 24 h.")


class ComponentDetail(ComponentStatus):
    history: list[ComponentCheck] = Field(
        default_factory=list, description=f"The last {HISTORY} probes, newest first."
    )


class ComponentList(BaseModel):
    data: list[ComponentStatus]


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _configured(conn: Connection, daemon: ProbeDaemon | None, since: int) -> list[tuple[str, str]]:
    if daemon is not None:
        return daemon.components()
    rows = conn.execute(
        select(cc.c.component, func.max(cc.c.kind))
        .where(cc.c.ts_ms >= since)
        .group_by(cc.c.component)
        .order_by(cc.c.component)
    ).all()
    return [(r[0], r[1]) for r in rows]


def _uptime(conn: Connection, names: list[str], since: int) -> dict[str, tuple[int, int]]:
    if not names:
        return {}
    rows = conn.execute(
        select(
            cc.c.component,
            func.count(),
            func.sum(case((cc.c.up, 1), else_=0)),
        )
        .where(cc.c.component.in_(names), cc.c.ts_ms >= since)
        .group_by(cc.c.component)
    ).all()
    return {r[0]: (int(r[1]), int(r[2] or 0)) for r in rows}


def _status(
    conn: Connection, name: str, kind: str, counts: tuple[int, int] | None
) -> dict[str, Any]:
    # One indexed lookup per component: (component, ts_ms) makes it a seek.
    last = conn.execute(
        select(cc).where(cc.c.component == name).order_by(cc.c.ts_ms.desc()).limit(1)
    ).first()
    total, ups = counts or (0, 0)
    out: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "up": None,
        "last_checked": None,
        "latency_ms": None,
        "error": None,
        "uptime_24h": ups / total if total else None,
        "checks_24h": total,
    }
    if last is not None:
        out.update(
            up=bool(last.up),
            last_checked=_ts(last.ts_ms),
            latency_ms=last.latency_ms,
            error=last.error,
        )
    return out


def list_components(engine: Engine, daemon: ProbeDaemon | None) -> dict[str, Any]:
    since = now_ms() - DAY_MS
    with engine.connect() as conn:
        comps = _configured(conn, daemon, since)
        counts = _uptime(conn, [n for n, _ in comps], since)
        return {"data": [_status(conn, n, k, counts.get(n)) for n, k in comps]}


def get_component(engine: Engine, daemon: ProbeDaemon | None, name: str) -> dict[str, Any]:
    since = now_ms() - DAY_MS
    with engine.connect() as conn:
        kinds = dict(_configured(conn, daemon, since))
        if name not in kinds and daemon is None:
            # Without the configuration, any component ever checked is known.
            kind = conn.execute(
                select(cc.c.kind).where(cc.c.component == name).limit(1)
            ).scalar_one_or_none()
            if kind is not None:
                kinds[name] = kind
        if name not in kinds:
            known = ", ".join(sorted(kinds)) or "(none configured)"
            raise NotFound(
                f"no component named '{name}'. Known components: {known}",
                code="component_not_found",
            )
        out = _status(conn, name, kinds[name], _uptime(conn, [name], since).get(name))
        rows = conn.execute(
            select(cc).where(cc.c.component == name).order_by(cc.c.ts_ms.desc()).limit(HISTORY)
        ).all()
    out["history"] = [
        {"ts": _ts(r.ts_ms), "up": bool(r.up), "latency_ms": r.latency_ms, "error": r.error}
        for r in rows
    ]
    return out


def make_router(engine: Engine, daemon: ProbeDaemon | None) -> APIRouter:
    r = APIRouter(prefix="/api/components", tags=["components"])

    @r.get("", response_model=ComponentList, summary="Every component: status and 24 h uptime")
    def _list() -> dict[str, Any]:
        return list_components(engine, daemon)

    # `path` so names with ':' or '/' (provider:openai, qdrant/main) are one parameter.
    @r.get(
        "/{name:path}",
        response_model=ComponentDetail,
        summary="One component with its last probes",
    )
    def _get(name: str) -> dict[str, Any]:
        return get_component(engine, daemon, name)

    return r
