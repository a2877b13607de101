"""The model registry: versions, aliases/stages, approvals, each change audited.

Every change is one transaction that also appends its row to ``audit_log``
(``registry.register``, ``registry.approve``, ``registry.reject``,
``registry.alias.set``, ``registry.alias.delete``): a change without its audit
row cannot happen. The audit log is append-only; nothing here updates or
deletes it. Who may approve is decided in front of this service (the API's
auth rules); this service records who did.

Rules: versions count from 1 per model; registering moves ``candidate`` to the
new version; approving moves ``approved`` (and only approving does);
``production`` accepts approved versions only, and setting it moves the version
it leaves to ``previous``. A decision is final: approve or reject a version once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from keel._ids import new_id
from keel.daemon import now_ms
from keel.errors import Conflict, InvalidRequest, KeelError, NotFound
from keel.prompts.store import PromptStore
from keel.registry.audit import append, target
from keel.registry.model import (
    APPROVED,
    CANDIDATE,
    PREVIOUS,
    PRODUCTION,
    check_alias,
    check_metrics,
    check_model_name,
    parse_deployment,
    parse_version,
)
from keel.runs.artifacts import ArtifactStore, check_path
from keel.runs.store import RunStore
from keel.store.jsontext import dumps as _dumps
from keel.store.tables_registry import approvals, model_aliases, model_versions, registered_models

log = logging.getLogger("keel.registry")

mv, ma, rm = model_versions, model_aliases, registered_models
_JSON_COLS = ("deployment", "metrics", "lineage")


class RegistryService:
    """Models, versions, aliases and approvals in ``engine``.

    ``on_approved`` callbacks get the approved version (a dict) after the commit;
    the deploy step hooks in here. A failing callback is logged, never undoes the
    approval."""

    def __init__(
        self,
        engine: Engine,
        runs: RunStore,
        artifacts: ArtifactStore,
        prompts: PromptStore,
        *,
        providers: Collection[str],
        max_card_bytes: int = 512 * 1024,
    ) -> None:
        self.engine = engine
        self.runs = runs
        self.artifacts = artifacts
        self.prompts = prompts
        self.providers = frozenset(providers)
        self.max_card_bytes = max_card_bytes
        self.on_approved: list[Callable[[dict[str, Any]], None]] = []

    # -- reading -----------------------------------------------------------------

    def _aliases(self, c: Connection, model: str) -> dict[str, int]:
        q = sa.select(ma.c.alias, ma.c.version).where(ma.c.model == model).order_by(ma.c.alias)
        return {a: v for a, v in c.execute(q)}

    def _require_model(self, c: Connection, model: str) -> Any:
        r = c.execute(sa.select(rm).where(rm.c.name == model)).first()
        if r is None:
            raise NotFound(
                f"no model '{model}' in the registry (see `keel registry list`)", param="model"
            )
        return r

    def list_models(self) -> list[dict[str, Any]]:
        """Every model with its latest version number, version count and aliases."""
        with self.engine.connect() as c:
            stats = {
                m: (n, latest)
                for m, n, latest in c.execute(
                    sa.select(mv.c.model, sa.func.count(), sa.func.max(mv.c.version)).group_by(
                        mv.c.model
                    )
                )
            }
            aliases: dict[str, dict[str, int]] = {}
            for m, a, v in c.execute(sa.select(ma.c.model, ma.c.alias, ma.c.version)):
                aliases.setdefault(m, {})[a] = v
            out = []
            for r in c.execute(sa.select(rm).order_by(rm.c.name)):
                n, latest = stats.get(r.name, (0, None))
                out.append(
                    {
                        **r._mapping,
                        "versions": n,
                        "latest_version": latest,
                        "aliases": dict(sorted(aliases.get(r.name, {}).items())),
                    }
                )
        return out

    def _version_out(self, c: Connection, r: Any, aliases: dict[str, int]) -> dict[str, Any]:
        d = dict(r._mapping)
        for k in _JSON_COLS:
            d[k] = orjson.loads(d[k]) if d[k] else None
        d["aliases"] = sorted(a for a, v in aliases.items() if v == r.version)
        q = (
            sa.select(approvals)
            .where((approvals.c.model == r.model) & (approvals.c.version == r.version))
            .order_by(approvals.c.ts_ms)
        )
        d["decisions"] = [dict(x._mapping) for x in c.execute(q)]
        return d

    def get_model(self, model: str) -> dict[str, Any]:
        """The model, its aliases and its versions (newest first, without cards)."""
        check_model_name(model)
        with self.engine.connect() as c:
            m = dict(self._require_model(c, model)._mapping)
            aliases = self._aliases(c, model)
            rows = c.execute(sa.select(mv).where(mv.c.model == model).order_by(mv.c.version.desc()))
            versions = []
            for r in rows:
                d = self._version_out(c, r, aliases)
                d.pop("card")
                versions.append(d)
        return {**m, "aliases": aliases, "versions": versions}

    def _resolve(self, c: Connection, model: str, ref: int | str) -> int:
        v = parse_version(ref)
        if v is not None:
            return v
        alias = check_alias(str(ref))
        aliases = self._aliases(c, model)
        if alias not in aliases:
            have = ", ".join(aliases) or "none"
            raise NotFound(
                f"model '{model}' has no alias '{alias}' (aliases: {have})", param="version"
            )
        return aliases[alias]

    def _version_row(self, c: Connection, model: str, version: int) -> Any:
        r = c.execute(
            sa.select(mv).where((mv.c.model == model) & (mv.c.version == version))
        ).first()
        if r is None:
            raise NotFound(f"model '{model}' has no version {version}", param="version")
        return r

    def get_version(self, model: str, ref: int | str) -> dict[str, Any]:
        """One version by number (3, v3) or alias (production), with card and decisions."""
        check_model_name(model)
        with self.engine.connect() as c:
            self._require_model(c, model)
            r = self._version_row(c, model, self._resolve(c, model, ref))
            return self._version_out(c, r, self._aliases(c, model))

    # -- changing ----------------------------------------------------------------

    def _lock_model(self, c: Connection, model: str, *, create_by: str | None = None) -> None:
        """Serialise changes to one model: the row update takes the lock (and on SQLite
        the database write lock) before anything is read."""
        now = now_ms()
        res = c.execute(rm.update().where(rm.c.name == model).values(updated_at_ms=now))
        if res.rowcount:
            return
        if create_by is None:
            raise NotFound(
                f"no model '{model}' in the registry (see `keel registry list`)", param="model"
            )
        try:
            with c.begin_nested():
                c.execute(
                    rm.insert().values(
                        name=model, created_at_ms=now, created_by=create_by, updated_at_ms=now
                    )
                )
        except sa.exc.IntegrityError:
            # Another registration created the model first (PostgreSQL made this insert
            # wait for its commit): lock the row it made instead.
            c.execute(rm.update().where(rm.c.name == model).values(updated_at_ms=now))

    def _move_alias(
        self, c: Connection, model: str, alias: str, version: int, by: str
    ) -> int | None:
        """Point ``alias`` at ``version``; returns where it pointed before."""
        cur = self._aliases(c, model).get(alias)
        if cur == version:
            return cur
        vals = {"version": version, "updated_by": by, "updated_at_ms": now_ms()}
        if cur is None:
            c.execute(ma.insert().values(model=model, alias=alias, **vals))
        else:
            c.execute(
                ma.update().where((ma.c.model == model) & (ma.c.alias == alias)).values(**vals)
            )
        return cur

    def register(
        self,
        model: str,
        *,
        principal: str,
        run_id: str | None = None,
        artifact: str | None = None,
        deployment: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        card: str | None = None,
        description: str | None = None,
    ) -> dict[str, Any]:
        """A new version (number = previous + 1): a run's artifact (file or directory)
        or a deployment config. Everything is checked before anything is written."""
        check_model_name(model)
        if (artifact is None) == (deployment is None):
            raise InvalidRequest("give either an artifact (with its run) or a deployment config")
        if artifact is not None and not run_id:
            raise InvalidRequest(
                "an artifact version needs the run that produced it (run_id)", param="run_id"
            )
        extra = check_metrics(metrics)
        if card is not None and len(card.encode()) > self.max_card_bytes:
            raise InvalidRequest(
                f"the model card is over {self.max_card_bytes // 1024} KiB (registry.max_card_kb)",
                param="card",
            )
        lineage: dict[str, Any] = {"run_id": run_id, "datasets": [], "prompts": [], "code": None}
        found: dict[str, Any] = {}
        if run_id:
            try:
                run = self.runs.get(run_id)
            except NotFound:
                raise InvalidRequest(
                    f"no run '{run_id}' (see `keel runs list`)", param="run_id"
                ) from None
            if run["status"] != "finished":
                raise Conflict(
                    f"run '{run_id}' is {run['status']}; only a finished run's "
                    "results can be registered",
                    param="run_id",
                )
            lineage.update(
                datasets=run["inputs"]["datasets"],
                prompts=run["inputs"]["prompts"],
                code=run["code"],
            )
            found = {
                k: p["value"] for k, p in run["metrics"].items() if not k.startswith("system/")
            }
        uri = spec = None
        if artifact is not None:
            assert run_id is not None
            files = self.artifacts.list(run_id, artifact)
            if not files:
                raise InvalidRequest(
                    f"run '{run_id}' has no artifact '{artifact}' (files or a "
                    "directory; see `keel runs show`)",
                    param="artifact",
                )
            uri = self.artifacts.uri(run_id, check_path(artifact))
        if deployment is not None:
            spec = parse_deployment(deployment).model_dump()
            if spec["provider"] not in self.providers:
                have = ", ".join(sorted(self.providers)) or "none"
                raise InvalidRequest(
                    f"deployment.provider: no provider '{spec['provider']}' is "
                    f"configured (providers: {have})",
                    param="deployment",
                )
            if spec["prompt"]:
                try:
                    pv = self.prompts.get(spec["prompt"])
                except KeelError as e:
                    raise InvalidRequest(f"deployment.prompt: {e}", param="deployment") from None
                pinned = {
                    "ref": spec["prompt"],
                    "name": pv.prompt,
                    "version": pv.version,
                    "id": pv.id,
                }
                spec["prompt"] = f"{pv.prompt}@{pv.version}"
                if all(p["id"] != pv.id for p in lineage["prompts"]):
                    lineage["prompts"] = [*lineage["prompts"], pinned]
        kind = "artifact" if artifact is not None else "deployment"
        with self.engine.begin() as c:
            self._lock_model(c, model, create_by=principal)
            latest = c.execute(sa.select(sa.func.max(mv.c.version)).where(mv.c.model == model))
            version = (latest.scalar() or 0) + 1
            c.execute(
                mv.insert().values(
                    model=model,
                    version=version,
                    kind=kind,
                    status=CANDIDATE,
                    source_run_id=run_id,
                    artifact_uri=uri,
                    deployment=_dumps(spec),
                    metrics=_dumps({**found, **extra}),
                    lineage=_dumps(lineage),
                    card=card,
                    description=description,
                    created_by=principal,
                    created_at_ms=now_ms(),
                )
            )
            before = self._move_alias(c, model, CANDIDATE, version, principal)
            append(
                c,
                principal,
                "registry.register",
                target(model, version),
                {
                    "model": model,
                    "version": version,
                    "kind": kind,
                    "run_id": run_id,
                    "artifact_uri": uri,
                    "deployment": spec,
                    "moved": {CANDIDATE: {"from": before, "to": version}},
                },
            )
        return self.get_version(model, version)

    def _decide(
        self, model: str, ref: int | str, principal: str, decision: str, note: str | None
    ) -> dict[str, Any]:
        check_model_name(model)
        with self.engine.begin() as c:
            self._lock_model(c, model)
            version = self._resolve(c, model, ref)
            r = self._version_row(c, model, version)
            if r.status != CANDIDATE:
                last = c.execute(
                    sa.select(approvals)
                    .where((approvals.c.model == model) & (approvals.c.version == version))
                    .order_by(approvals.c.ts_ms.desc())
                    .limit(1)
                ).first()
                who = f" by {last.principal}" if last else ""
                why = f" (note: {last.note})" if last and last.note else ""
                if (decision, r.status) in (("approve", APPROVED), ("reject", "rejected")):
                    msg = f"{model} v{version} is already {r.status}{who}{why}"
                else:
                    msg = (
                        f"{model} v{version} was {r.status}{who}{why}; a decision is final — "
                        "register a new version to decide again"
                    )
                raise Conflict(msg, code=f"already_{r.status}", param="version")
            status = APPROVED if decision == "approve" else "rejected"
            c.execute(
                mv.update()
                .where((mv.c.model == model) & (mv.c.version == version))
                .values(status=status)
            )
            c.execute(
                approvals.insert().values(
                    id=new_id(),
                    model=model,
                    version=version,
                    decision=decision,
                    principal=principal,
                    note=note,
                    ts_ms=now_ms(),
                )
            )
            moved: dict[str, Any] = {}
            if decision == "approve":
                moved[APPROVED] = {
                    "from": self._move_alias(c, model, APPROVED, version, principal),
                    "to": version,
                }
            elif self._aliases(c, model).get(CANDIDATE) == version:
                c.execute(ma.delete().where((ma.c.model == model) & (ma.c.alias == CANDIDATE)))
                moved[CANDIDATE] = {"from": version, "to": None}
            append(
                c,
                principal,
                f"registry.{decision}",
                target(model, version),
                {"model": model, "version": version, "note": note, "moved": moved},
            )
        out = self.get_version(model, version)
        if decision == "approve":
            for hook in list(self.on_approved):
                try:
                    hook(out)
                except Exception:
                    log.exception("on_approved hook %r failed for %s v%s", hook, model, version)
        return out

    def approve(
        self, model: str, version: int | str, *, principal: str, note: str | None = None
    ) -> dict[str, Any]:
        """Approve a candidate: status approved, alias ``approved`` moves to it."""
        return self._decide(model, version, principal, "approve", note)

    def reject(self, model: str, version: int | str, *, principal: str, note: str) -> dict:
        """Reject a candidate (a note saying why is required)."""
        if not note or not note.strip():
            raise InvalidRequest("a rejection needs a note saying why (--note)", param="note")
        return self._decide(model, version, principal, "reject", note)

    def set_alias(
        self, model: str, alias: str, version: int | str, *, principal: str, note: str | None = None
    ) -> dict[str, Any]:
        """Point an alias at a version; ``production`` needs an approved version and moves
        the one it leaves to ``previous``. ``approved`` moves only by approving."""
        check_model_name(model)
        check_alias(alias)
        if alias == APPROVED:
            raise InvalidRequest(
                "the 'approved' alias moves only by approving a version "
                "(keel registry approve MODEL VERSION)",
                param="alias",
            )
        with self.engine.begin() as c:
            self._lock_model(c, model)
            v = self._resolve(c, model, version)
            r = self._version_row(c, model, v)
            if r.status == "rejected":
                raise Conflict(
                    f"{model} v{v} was rejected; a rejected version takes no alias", param="version"
                )
            if alias == PRODUCTION and r.status != APPROVED:
                raise Conflict(
                    f"{model} v{v} is {r.status}; only an approved version goes to "
                    f"production (keel registry approve {model} {v})",
                    param="version",
                )
            before = self._move_alias(c, model, alias, v, principal)
            moved: dict[str, Any] = {alias: {"from": before, "to": v}}
            if before == v:
                return {"model": model, "alias": alias, "version": v, "changed": False, "moved": {}}
            if alias == PRODUCTION and before is not None:
                prev = self._move_alias(c, model, PREVIOUS, before, principal)
                moved[PREVIOUS] = {"from": prev, "to": before}
            append(
                c,
                principal,
                "registry.alias.set",
                target(model, alias=alias),
                {"model": model, "alias": alias, "version": v, "note": note, "moved": moved},
            )
        return {"model": model, "alias": alias, "version": v, "changed": True, "moved": moved}

    def delete_alias(
        self, model: str, alias: str, *, principal: str, note: str | None = None
    ) -> dict[str, Any]:
        check_model_name(model)
        check_alias(alias)
        if alias == APPROVED:
            raise InvalidRequest("the 'approved' alias is kept by the registry", param="alias")
        with self.engine.begin() as c:
            self._lock_model(c, model)
            cur = self._aliases(c, model).get(alias)
            if cur is None:
                raise NotFound(f"model '{model}' has no alias '{alias}'", param="alias")
            c.execute(ma.delete().where((ma.c.model == model) & (ma.c.alias == alias)))
            append(
                c,
                principal,
                "registry.alias.delete",
                target(model, alias=alias),
                {"model": model, "alias": alias, "version": cur, "note": note},
            )
        return {"model": model, "alias": alias, "version": cur, "deleted": True}
