"""Deployments, their events and the routes, in the store.

Every state change is a compare-and-set (``UPDATE … WHERE id = ? AND state = ?``)
in one transaction with its numbered event and the route change it implies, so
that a transition happens exactly once even when a restarted monitor, another
replica and an operator race for it: whoever commits first wins and the others
see ``False``. At most one deployment per model is active: ``active_key`` holds
the model's name while it is, under a unique constraint.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from keel._ids import new_id
from keel.daemon import now_ms
from keel.deploy.model import ACTIVE, CANARY, CANCELLED, FINAL, PENDING, TRANSITIONS, Target
from keel.errors import Conflict, NotFound
from keel.store.jsontext import dumps as _dumps
from keel.store.tables_deploy import deploy_routes, deployment_events, deployments

D, E, R = deployments, deployment_events, deploy_routes
_JSON = ("target", "validation", "comparison")


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()


@dataclass
class RouteChange:
    """What a transition does to the alias' route (``stable`` KEEP: leave it as it is)."""

    alias: str
    model: str
    stable: Any = KEEP  # Target | None (the keel.yaml alias) | KEEP
    canary: Target | None = None
    share: float = 0.0


def _deployment(r: Any) -> dict[str, Any]:
    d = dict(r._mapping)
    for k in _JSON:
        d[k] = orjson.loads(d[k]) if d.get(k) else None
    d.pop("active_key", None)
    return d


def _route(r: Any) -> dict[str, Any]:
    d = dict(r._mapping)
    for k in ("stable", "canary"):
        d[k] = orjson.loads(d[k]) if d.get(k) else None
    return d


class DeployStore:
    """Reads and writes of the deployment tables; thread-safe (an engine per call)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- reading -------------------------------------------------------------------

    def get(self, dep_id: str) -> dict[str, Any]:
        with self.engine.connect() as c:
            r = c.execute(sa.select(D).where(D.c.id == dep_id)).first()
        if r is None:
            raise NotFound(f"no deployment '{dep_id}'", param="id")
        return _deployment(r)

    def list(
        self, model: str | None = None, state: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        q = sa.select(D).order_by(D.c.created_at_ms.desc(), D.c.id.desc()).limit(limit)
        if model is not None:
            q = q.where(D.c.model == model)
        if state is not None:
            q = q.where(D.c.state == state)
        with self.engine.connect() as c:
            return [_deployment(r) for r in c.execute(q)]

    def active(self, model: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            r = c.execute(sa.select(D).where(D.c.active_key == model)).first()
        return _deployment(r) if r is not None else None

    def in_states(self, states: tuple[str, ...]) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            rows = c.execute(sa.select(D).where(D.c.state.in_(states)).order_by(D.c.created_at_ms))
            return [_deployment(r) for r in rows]

    def latest_promoted(self, model: str) -> dict[str, Any] | None:
        q = (
            sa.select(D)
            .where((D.c.model == model) & (D.c.state == "promoted"))
            .order_by(D.c.state_since_ms.desc())
            .limit(1)
        )
        with self.engine.connect() as c:
            r = c.execute(q).first()
        return _deployment(r) if r is not None else None

    def target_of(self, model: str, version: int) -> Target | None:
        """The target a version was last deployed with (None when it never was)."""
        q = (
            sa.select(D.c.target)
            .where((D.c.model == model) & (D.c.version == version) & D.c.target.is_not(None))
            .order_by(D.c.created_at_ms.desc())
            .limit(1)
        )
        with self.engine.connect() as c:
            return Target.from_json(c.execute(q).scalar())

    def has_deployment(self, model: str, version: int) -> bool:
        q = sa.select(D.c.id).where((D.c.model == model) & (D.c.version == version)).limit(1)
        with self.engine.connect() as c:
            return c.execute(q).first() is not None

    def events(self, dep_id: str) -> list[dict[str, Any]]:
        q = sa.select(E).where(E.c.deployment_id == dep_id).order_by(E.c.seq)
        with self.engine.connect() as c:
            rows = [dict(r._mapping) for r in c.execute(q)]
        for e in rows:
            e["details"] = orjson.loads(e["details"]) if e["details"] else None
        return rows

    def routes(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            return [_route(r) for r in c.execute(sa.select(R).order_by(R.c.alias))]

    def route(self, alias: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            r = c.execute(sa.select(R).where(R.c.alias == alias)).first()
        return _route(r) if r is not None else None

    def revisions(self) -> dict[str, int]:
        """(alias → revision) of every route: what a gateway replica polls."""
        with self.engine.connect() as c:
            return {a: int(v) for a, v in c.execute(sa.select(R.c.alias, R.c.revision))}

    # -- writing -------------------------------------------------------------------

    def create(
        self,
        *,
        model: str,
        version: int,
        alias: str,
        canary_share: float,
        actor: str,
    ) -> dict[str, Any]:
        """A new deployment in ``pending_validation``.

        An active deployment of the same model is superseded: cancelled with a
        recorded reason (its canary, if any, removed from the route at once) in
        the same transaction, so the newest approval is the one that proceeds.
        The baseline is the version the alias' route serves now (None: the
        keel.yaml alias, or nothing).
        """
        now = now_ms()
        dep_id = new_id()
        with self.engine.begin() as c:
            self._lock_model(c, model)
            same = c.execute(
                sa.select(D).where((D.c.model == model) & (D.c.version == version)).limit(1)
            ).first()
            if same is not None:  # the hook and the catch-up may both see one approval
                return _deployment(same)
            old = c.execute(sa.select(D).where(D.c.active_key == model)).first()
            if old is not None:
                change = None
                if old.state == CANARY:
                    change = RouteChange(old.alias, model, KEEP, None, 0.0)
                moved = self._move(
                    c,
                    old.id,
                    old.state,
                    CANCELLED,
                    actor,
                    f"superseded by {model}@{version}, approved while this one was {old.state}",
                    None,
                    {},
                    now,
                )
                if not moved:
                    raise Conflict(f"{model}: a deployment changed state meanwhile; try again")
                if change is not None:
                    self._write_route(c, change, old.id, actor, now)
            route = c.execute(sa.select(R).where(R.c.alias == alias)).first()
            stable = Target.from_json(route.stable) if route is not None else None
            baseline = stable.version if stable is not None and stable.model == model else None
            c.execute(
                D.insert().values(
                    id=dep_id,
                    model=model,
                    version=version,
                    alias=alias,
                    baseline_version=baseline,
                    state=PENDING,
                    active_key=model,
                    seq=1,
                    canary_share=canary_share,
                    created_by=actor,
                    created_at_ms=now,
                    updated_at_ms=now,
                    state_since_ms=now,
                    reason=f"approved; {model}@{version} waits for validation",
                )
            )
            c.execute(
                E.insert().values(
                    deployment_id=dep_id,
                    seq=1,
                    from_state=None,
                    to_state=PENDING,
                    actor=actor,
                    reason="approved",
                    ts_ms=now,
                )
            )
        return self.get(dep_id)

    @staticmethod
    def _lock_model(c: Connection, model: str) -> None:
        """Serialise the deployments of one model for the rest of this transaction."""
        if c.dialect.name == "postgresql":
            key = int.from_bytes(
                hashlib.sha256(f"keel-deploy:{model}".encode()).digest()[:8], "big"
            )
            c.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key - (1 << 63)})
        else:
            # SQLite: write first, so the transaction holds the write lock before it
            # reads anything (a read snapshot cannot go stale under it).
            c.execute(D.update().where(D.c.active_key == model).values(seq=D.c.seq))

    def transition(
        self,
        dep_id: str,
        frm: str,
        to: str,
        *,
        actor: str,
        reason: str,
        details: dict[str, Any] | None = None,
        updates: dict[str, Any] | None = None,
        route: RouteChange | None = None,
    ) -> dict[str, Any] | None:
        """Move ``frm → to`` if the deployment is still in ``frm``; None when it was not.

        The event (numbered after the last one) and the route change commit with it.
        """
        if to not in TRANSITIONS.get(frm, frozenset()):
            raise Conflict(f"a deployment cannot go from {frm} to {to}")
        now = now_ms()
        vals = dict(updates or {})
        for k in _JSON:
            if k in vals and not isinstance(vals[k], str | None):
                vals[k] = _dumps(vals[k])
        with self.engine.begin() as c:
            if not self._move(c, dep_id, frm, to, actor, reason, details, vals, now):
                return None
            if route is not None:
                self._write_route(c, route, dep_id, actor, now)
        return self.get(dep_id)

    def _move(
        self,
        c: Connection,
        dep_id: str,
        frm: str,
        to: str,
        actor: str,
        reason: str,
        details: dict[str, Any] | None,
        vals: dict[str, Any],
        now: int,
    ) -> bool:
        values: dict[str, Any] = {
            "state": to,
            "seq": D.c.seq + 1,
            "reason": reason,
            "updated_at_ms": now,
            "state_since_ms": now,
            **vals,
        }
        if to in FINAL:
            values["active_key"] = None
        res = c.execute(D.update().where((D.c.id == dep_id) & (D.c.state == frm)).values(**values))
        if res.rowcount != 1:
            return False
        seq = c.execute(sa.select(D.c.seq).where(D.c.id == dep_id)).scalar_one()
        c.execute(
            E.insert().values(
                deployment_id=dep_id,
                seq=seq,
                from_state=frm,
                to_state=to,
                actor=actor[:200],
                reason=reason,
                details=_dumps(details),
                ts_ms=now,
            )
        )
        return True

    def _write_route(
        self, c: Connection, ch: RouteChange, dep_id: str | None, actor: str, now: int
    ) -> None:
        vals: dict[str, Any] = {
            "model": ch.model,
            "canary": ch.canary.to_json() if ch.canary is not None else None,
            "canary_share": ch.share if ch.canary is not None else 0.0,
            "deployment_id": dep_id,
            "updated_at_ms": now,
            "updated_by": actor[:200],
        }
        if ch.stable is not KEEP:
            vals["stable"] = ch.stable.to_json() if ch.stable is not None else None
        res = c.execute(
            R.update().where(R.c.alias == ch.alias).values(**vals, revision=R.c.revision + 1)
        )
        if res.rowcount == 0:
            vals.setdefault("stable", None)
            c.execute(R.insert().values(alias=ch.alias, revision=1, **vals))

    def set_route(
        self, change: RouteChange, *, actor: str, deployment_id: str | None = None
    ) -> int:
        """Write a route outside any deployment (operators' tooling, benchmarks); its revision."""
        with self.engine.begin() as c:
            self._write_route(c, change, deployment_id, actor, now_ms())
            return int(c.execute(sa.select(R.c.revision).where(R.c.alias == change.alias)).scalar())

    def claim_validation(self, dep_id: str, worker: str, previous: str | None) -> bool:
        """Take over a ``validating`` deployment whose worker is ``previous`` (CAS)."""
        cond = (D.c.id == dep_id) & (D.c.state == "validating")
        cond &= D.c.worker.is_(None) if previous is None else (D.c.worker == previous)
        with self.engine.begin() as c:
            res = c.execute(D.update().where(cond).values(worker=worker, updated_at_ms=now_ms()))
            return res.rowcount == 1

    def save(self, dep_id: str, state: str, **vals: Any) -> bool:
        """Update JSON/progress columns of a deployment still in ``state`` (no event)."""
        for k in _JSON:
            if k in vals and not isinstance(vals[k], str | None):
                vals[k] = _dumps(vals[k])
        with self.engine.begin() as c:
            res = c.execute(
                D.update()
                .where((D.c.id == dep_id) & (D.c.state == state))
                .values(**vals, updated_at_ms=now_ms())
            )
            return res.rowcount == 1

    def unnotified(self) -> list[dict[str, Any]]:
        """Final deployments whose outcome the channels (and the registry) were not told yet."""
        cond = D.c.state.in_(FINAL) & (
            D.c.notified_state.is_(None) | (D.c.notified_state != D.c.state)
        )
        with self.engine.connect() as c:
            return [_deployment(r) for r in c.execute(sa.select(D).where(cond))]

    def mark_notified(self, dep_id: str, state: str) -> None:
        with self.engine.begin() as c:
            c.execute(
                D.update()
                .where((D.c.id == dep_id) & (D.c.state == state))
                .values(notified_state=state)
            )

    def active_all(self) -> list[dict[str, Any]]:
        return self.in_states(ACTIVE)
