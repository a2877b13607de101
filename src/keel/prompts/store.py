"""Prompt versions and labels in the store.

Versions are immutable and numbered 1, 2, 3 … per prompt; a push whose content
hash equals the latest version's makes no new version. Labels (``production``,
``staging``, any name) point at a version and move only when someone moves
them.

Replicas: :meth:`PromptStore.get` keeps what it read for ``cache_ttl_s``
(default 1 s), so the gateway does not query the store on every call. A label
moved on one replica (or from the CLI) is therefore seen by every other replica
within that TTL; the replica that moved it sees it at once. Lookups of an
explicit version are cached longer: a version never changes.
"""

from __future__ import annotations

import difflib
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson
import yaml
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from keel._ids import new_id
from keel.errors import Conflict, InvalidRequest, NotFound, StoreUnavailable
from keel.prompts.model import PromptSpec, parse_spec, resolve_ref
from keel.store.tables import prompt_labels, prompt_versions, prompts

DEFAULT_LABEL = "production"
LATEST = "latest"
_LABEL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,99}$")
_VERSION_RE = re.compile(r"^v?[0-9]+$")
_PUSH_ATTEMPTS = 50
_VERSION_CACHE_S = 3600.0
_CACHE_MAX = 4096


@dataclass(frozen=True)
class PromptVersion:
    """One immutable version of a prompt."""

    id: str
    prompt: str
    version: int
    content_hash: str
    spec: PromptSpec
    created_at_ms: int
    created_by: str | None
    message: str | None

    @property
    def ref(self) -> str:
        return f"{self.prompt}@v{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.prompt,
            "version": self.version,
            "content_hash": self.content_hash,
            "spec": self.spec.to_dict(),
            "created_at_ms": self.created_at_ms,
            "created_by": self.created_by,
            "message": self.message,
        }


def _now_ms() -> int:
    return int(time.time() * 1000)


def _row(r: Any) -> PromptVersion:
    m = r._mapping
    return PromptVersion(
        id=m["id"],
        prompt=m["prompt"],
        version=m["version"],
        content_hash=m["content_hash"],
        spec=PromptSpec.model_validate(orjson.loads(m["spec"])),
        created_at_ms=m["created_at_ms"],
        created_by=m["created_by"],
        message=m["message"],
    )


def check_label(label: str) -> str:
    if not isinstance(label, str) or not _LABEL_RE.match(label) or label == LATEST:
        raise InvalidRequest(
            f"invalid label '{label}': start with a letter; letters, digits, '.', '_', '-' "
            f"(and not '{LATEST}', which always means the newest version)",
            param="label",
        )
    if _VERSION_RE.match(label):
        raise InvalidRequest(f"label '{label}' would read as a version number", param="label")
    return label


def spec_yaml(spec: PromptSpec) -> str:
    return yaml.safe_dump(spec.to_dict(), sort_keys=False, allow_unicode=True, width=100)


class PromptStore:
    """Prompts, their versions and labels, over a SQLAlchemy engine."""

    def __init__(self, engine: Engine, cache_ttl_s: float = 1.0) -> None:
        self.engine = engine
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[tuple[str, int | None, str | None], tuple[float, Any]] = {}
        self._lock = threading.Lock()

    # -- writes ---------------------------------------------------------------

    def push(
        self, spec: PromptSpec | dict[str, Any], created_by: str | None = None,
        message: str | None = None,
    ) -> tuple[PromptVersion, bool]:  # fmt: skip
        """Store ``spec`` as the next version unless it equals the latest.

        Returns (version, created). Concurrent pushes of one prompt get
        consecutive numbers: each inserts latest+1 in a transaction and, when
        the unique (prompt, version) index says another push won, tries again.
        """
        if not isinstance(spec, PromptSpec):
            spec = parse_spec(spec)
        h = spec.content_hash
        body = orjson.dumps(spec.to_dict()).decode()
        for attempt in range(_PUSH_ATTEMPTS):
            try:
                with self.engine.begin() as c:
                    latest = c.execute(
                        select(prompt_versions)
                        .where(prompt_versions.c.prompt == spec.name)
                        .order_by(prompt_versions.c.version.desc())
                        .limit(1)
                    ).first()
                    if latest is not None and latest.content_hash == h:
                        return _row(latest), False
                    now = _now_ms()
                    if latest is None:
                        exists = c.execute(
                            select(prompts.c.name).where(prompts.c.name == spec.name)
                        ).first()
                        if exists is None:
                            c.execute(
                                prompts.insert().values(
                                    name=spec.name, description=spec.description, created_at_ms=now
                                )
                            )
                    else:
                        c.execute(
                            update(prompts)
                            .where(prompts.c.name == spec.name)
                            .values(description=spec.description)
                        )
                    row = {
                        "id": new_id(),
                        "prompt": spec.name,
                        "version": (latest.version if latest is not None else 0) + 1,
                        "content_hash": h,
                        "spec": body,
                        "created_at_ms": now,
                        "created_by": created_by,
                        "message": message,
                    }
                    c.execute(prompt_versions.insert().values(**row))
            except (IntegrityError, OperationalError) as e:
                if isinstance(e, OperationalError) and "locked" not in str(e):
                    raise StoreUnavailable(f"cannot store prompt '{spec.name}': {e}") from e
                # Another push took this number (or SQLite was busy): read again.
                if attempt == _PUSH_ATTEMPTS - 1:
                    raise Conflict(
                        f"could not store a new version of prompt '{spec.name}': "
                        "too many concurrent pushes; try again"
                    ) from None
                time.sleep(random.uniform(0.001, 0.01) * min(attempt + 1, 10))
                continue
            self._forget(spec.name)
            pv = PromptVersion(spec=spec, **{k: v for k, v in row.items() if k != "spec"})
            return pv, True
        raise AssertionError("unreachable")

    def set_label(self, name: str, label: str, version: int, by: str | None = None) -> int | None:
        """Point ``label`` at ``version`` (atomically); returns the version it pointed at."""
        check_label(label)
        if isinstance(version, str):
            version = _parse_version(version)
        with self.engine.begin() as c:
            found = c.execute(
                select(prompt_versions.c.id).where(
                    prompt_versions.c.prompt == name, prompt_versions.c.version == version
                )
            ).first()
            if found is None:
                self._require_prompt(c, name)
                raise NotFound(
                    f"prompt '{name}' has no version {version} "
                    f"(latest: v{self._latest_number(c, name)})",
                    param="version",
                )
            old = c.execute(
                select(prompt_labels.c.version).where(
                    prompt_labels.c.prompt == name, prompt_labels.c.label == label
                )
            ).scalar()
            values = {
                "prompt": name,
                "label": label,
                "version": version,
                "updated_at_ms": _now_ms(),
                "updated_by": by,
            }
            ins = (pg_insert if c.dialect.name == "postgresql" else sqlite_insert)(prompt_labels)
            c.execute(
                ins.values(**values).on_conflict_do_update(
                    index_elements=["prompt", "label"],
                    set_={k: values[k] for k in ("version", "updated_at_ms", "updated_by")},
                )
            )
        self._forget(name)
        return old

    # -- reads ----------------------------------------------------------------

    def get(
        self, name: str, version: int | str | None = None, label: str | None = None
    ) -> PromptVersion:
        """A version by reference (``name``, ``name@label``, ``name@3``, ``name@v3``),
        or by ``version`` / ``label``. Default: the ``production`` label when the
        prompt has one, else the latest version. Cached for ``cache_ttl_s``."""
        if "@" in name:
            if version is not None or label is not None:
                raise InvalidRequest("pass a reference with '@' or version/label, not both")
            name, version, label = resolve_ref(name)
        elif isinstance(version, str):
            version = _parse_version(version)
        key = (name, version, label)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            if isinstance(hit[1], Exception):
                raise hit[1]
            return hit[1]
        try:
            pv = self._load(name, version, label)
        except NotFound as e:
            self._put(key, now + self.cache_ttl_s, e)
            raise
        ttl = _VERSION_CACHE_S if version is not None else self.cache_ttl_s
        self._put(key, now + ttl, pv)
        return pv

    def _load(self, name: str, version: int | None, label: str | None) -> PromptVersion:
        with self.engine.connect() as c:
            q = select(prompt_versions).where(prompt_versions.c.prompt == name)
            if version is not None:
                r = c.execute(q.where(prompt_versions.c.version == version)).first()
                if r is None:
                    self._require_prompt(c, name)
                    raise NotFound(f"prompt '{name}' has no version {version}", param="prompt")
                return _row(r)
            if label is None or label != LATEST:
                want = label or DEFAULT_LABEL
                r = c.execute(
                    q.join(
                        prompt_labels,
                        (prompt_labels.c.prompt == prompt_versions.c.prompt)
                        & (prompt_labels.c.version == prompt_versions.c.version),
                    ).where(prompt_labels.c.label == want)
                ).first()
                if r is not None:
                    return _row(r)
                if label is not None:
                    self._require_prompt(c, name)
                    have = c.execute(
                        select(prompt_labels.c.label)
                        .where(prompt_labels.c.prompt == name)
                        .order_by(prompt_labels.c.label)
                    ).scalars()
                    raise NotFound(
                        f"prompt '{name}' has no label '{label}' "
                        f"(labels: {', '.join(have) or 'none'})",
                        param="prompt",
                    )
            r = c.execute(q.order_by(prompt_versions.c.version.desc()).limit(1)).first()
            if r is None:
                raise NotFound(f"prompt '{name}' does not exist", param="prompt")
            return _row(r)

    def list(self) -> list[dict[str, Any]]:
        """Every prompt with its latest version and labels."""
        with self.engine.connect() as c:
            latest = dict(
                c.execute(
                    select(prompt_versions.c.prompt, func.max(prompt_versions.c.version)).group_by(
                        prompt_versions.c.prompt
                    )
                ).all()
            )
            labels: dict[str, dict[str, int]] = {}
            for p, lab, v in c.execute(
                select(prompt_labels.c.prompt, prompt_labels.c.label, prompt_labels.c.version)
            ):
                labels.setdefault(p, {})[lab] = v
            rows = c.execute(select(prompts).order_by(prompts.c.name)).all()
        return [
            {
                "name": r.name,
                "description": r.description,
                "latest_version": latest.get(r.name),
                "labels": dict(sorted(labels.get(r.name, {}).items())),
                "created_at_ms": r.created_at_ms,
            }
            for r in rows
        ]

    def versions(self, name: str) -> list[PromptVersion]:
        """Every version of ``name``, oldest first."""
        with self.engine.connect() as c:
            rows = c.execute(
                select(prompt_versions)
                .where(prompt_versions.c.prompt == name)
                .order_by(prompt_versions.c.version)
            ).all()
            if not rows:
                self._require_prompt(c, name)
        return [_row(r) for r in rows]

    def labels(self, name: str) -> list[dict[str, Any]]:
        """The labels of ``name``: label, version, updated_at_ms, updated_by."""
        with self.engine.connect() as c:
            self._require_prompt(c, name)
            rows = c.execute(
                select(prompt_labels)
                .where(prompt_labels.c.prompt == name)
                .order_by(prompt_labels.c.label)
            ).all()
        return [
            {k: r._mapping[k] for k in ("label", "version", "updated_at_ms", "updated_by")}
            for r in rows
        ]

    def diff(self, name: str, a: int | str, b: int | str) -> str:
        """Unified diff of the YAML of two versions (numbers, ``v3`` or labels)."""
        return self.compare(name, a, b)[2]

    def compare(
        self, name: str, a: int | str, b: int | str
    ) -> tuple[PromptVersion, PromptVersion, str]:
        """(version a, version b, unified diff of their YAML)."""
        va, vb = self.lookup(name, a), self.lookup(name, b)
        text = "".join(
            difflib.unified_diff(
                spec_yaml(va.spec).splitlines(keepends=True),
                spec_yaml(vb.spec).splitlines(keepends=True),
                fromfile=f"{name}@v{va.version}",
                tofile=f"{name}@v{vb.version}",
            )
        )
        return va, vb, text

    def lookup(self, name: str, which: int | str) -> PromptVersion:
        """A version by number (3, "v3") or label, read from the store (no cache)."""
        if isinstance(which, int) or _VERSION_RE.match(which):
            return self._load(name, _parse_version(which), None)
        return self._load(name, None, which)

    # -- helpers --------------------------------------------------------------

    def _require_prompt(self, c: Any, name: str) -> None:
        if c.execute(select(prompts.c.name).where(prompts.c.name == name)).first() is None:
            raise NotFound(f"prompt '{name}' does not exist", param="prompt")

    @staticmethod
    def _latest_number(c: Any, name: str) -> int | None:
        return c.execute(
            select(func.max(prompt_versions.c.version)).where(prompt_versions.c.prompt == name)
        ).scalar()

    def _put(self, key: tuple[str, int | None, str | None], until: float, value: Any) -> None:
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()  # crude but bounded; refs per process are few
        self._cache[key] = (until, value)

    def _forget(self, name: str) -> None:
        with self._lock:
            for k in [k for k in self._cache if k[0] == name]:
                self._cache.pop(k, None)


def _parse_version(v: int | str) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    m = re.match(r"^v?([0-9]+)$", str(v))
    if not m:
        raise InvalidRequest(f"invalid version '{v}': use 3 or v3", param="version")
    return int(m.group(1))
