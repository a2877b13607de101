"""Run artifacts: files under ``<artifact_root>/runs/<run_id>/`` (a path or any fsspec URL).

An upload streams into a temporary file next to its final place; the row in
``run_artifacts`` is inserted first (its primary key refuses a second upload of
the same path), then the file is moved into place. Whatever fails on the way
removes what it wrote: there is never a row without its file, nor a half file.
Artifacts are immutable once stored, because registered model versions point
at them.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import uuid
from typing import IO, Any

import fsspec
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keel.daemon import now_ms
from keel.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from keel.store.tables_registry import run_artifacts, runs

MAX_PATH = 500
_BAD_CHARS = re.compile(r"[\x00-\x1f\\]")


def check_path(path: Any) -> str:
    """A relative '/'-separated artifact path with no '.', '..' or empty parts."""
    if not isinstance(path, str) or not path.strip():
        raise InvalidRequest("an artifact path is required", param="path")
    p = path.strip()
    while p.startswith("./"):
        p = p[2:]
    parts = p.split("/")
    if (
        len(p) > MAX_PATH
        or p.startswith("/")
        or _BAD_CHARS.search(p)
        or any(part in ("", ".", "..") for part in parts)
        or any(part.endswith(".keel-part") for part in parts)
    ):
        raise InvalidRequest(
            f"invalid artifact path {path!r}: use a relative path like 'model/weights.bin' "
            f"(no '..', no empty parts, no backslashes, ≤{MAX_PATH} characters)",
            param="path",
        )
    return p


class ArtifactUpload:
    """One file being written; ``write`` chunks, then ``commit`` (or ``abort``)."""

    def __init__(self, store: ArtifactStore, run_id: str, path: str, max_bytes: int) -> None:
        self.store, self.run_id, self.path, self.max_bytes = store, run_id, path, max_bytes
        self.uri = store.uri(run_id, path)
        self._final = store._fs_path(self.uri)
        self._tmp = f"{self._final}.{uuid.uuid4().hex[:12]}.keel-part"
        parent = self._final.rsplit("/", 1)[0]
        store.fs.makedirs(parent, exist_ok=True)
        self._f: IO[bytes] | None = store.fs.open(self._tmp, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        if self._f is None:
            raise InvalidRequest("this upload is already closed")
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.abort()
            raise PayloadTooLarge(
                f"artifact '{self.path}' is larger than the limit of "
                f"{self.max_bytes // (1024 * 1024)} MiB (registry.max_artifact_mb)",
                param="path",
            )
        self._hash.update(chunk)
        self._f.write(chunk)

    def abort(self) -> None:
        if self._f is not None:
            with contextlib.suppress(Exception):
                self._f.close()
            self._f = None
        with contextlib.suppress(Exception):
            self.store.fs.rm(self._tmp)

    def commit(self) -> dict[str, Any]:
        """Record the file and move it into place; returns its row."""
        if self._f is None:
            raise InvalidRequest("this upload is already closed")
        try:
            self._f.close()
        except BaseException:
            self.abort()
            raise
        self._f = None
        row = {
            "run_id": self.run_id,
            "path": self.path,
            "size": self.size,
            "sha256": self._hash.hexdigest(),
            "uri": self.uri,
            "created_at_ms": now_ms(),
        }
        try:
            with self.store.engine.begin() as c:
                c.execute(run_artifacts.insert().values(**row))
        except sa.exc.IntegrityError:
            self.abort()
            raise Conflict(
                f"run '{self.run_id}' already has an artifact '{self.path}'; artifacts do not "
                "change once stored (use another name)",
                param="path",
            ) from None
        except BaseException:
            self.abort()
            raise
        try:
            self.store.fs.mv(self._tmp, self._final)
        except BaseException:
            self.abort()
            with self.store.engine.begin() as c:
                c.execute(
                    run_artifacts.delete().where(
                        (run_artifacts.c.run_id == self.run_id)
                        & (run_artifacts.c.path == self.path)
                    )
                )
            raise
        return row


class ArtifactStore:
    """Artifact files of runs on ``artifact_root``, listed in ``run_artifacts``."""

    def __init__(self, engine: Engine, artifact_root: str) -> None:
        self.engine = engine
        self.root = str(artifact_root).rstrip("/")
        self.fs, _ = fsspec.core.url_to_fs(self.root)

    def uri(self, run_id: str, path: str = "") -> str:
        return "/".join(p for p in (self.root, "runs", run_id, path) if p)

    @staticmethod
    def _fs_path(uri: str) -> str:
        return fsspec.core.url_to_fs(uri)[1]

    def _require_run(self, run_id: str) -> None:
        with self.engine.connect() as c:
            if c.execute(sa.select(runs.c.id).where(runs.c.id == run_id)).first() is None:
                raise NotFound(f"no run '{run_id}' (see `keel runs list`)", param="run_id")

    def begin(self, run_id: str, path: str, *, max_bytes: int) -> ArtifactUpload:
        """Start an upload (404 for an unknown run, 409 when the path is taken)."""
        p = check_path(path)
        self._require_run(run_id)
        if self.get(run_id, p, required=False) is not None:
            raise Conflict(
                f"run '{run_id}' already has an artifact '{p}'; artifacts do not change once "
                "stored (use another name)",
                param="path",
            )
        # A file cannot also be a directory: 'model' and 'model/w.bin' cannot both exist.
        parents = ["/".join(p.split("/")[:i]) for i in range(1, p.count("/") + 1)]
        q = sa.select(run_artifacts.c.path).where(
            (run_artifacts.c.run_id == run_id)
            & (
                run_artifacts.c.path.in_(parents)
                | run_artifacts.c.path.startswith(p + "/", autoescape=True)
            )
        )
        with self.engine.connect() as c:
            clash = c.execute(q.limit(1)).scalar()
        if clash is not None:
            raise Conflict(
                f"artifact path '{p}' collides with the stored artifact '{clash}' "
                "(a name cannot be both a file and a directory)",
                param="path",
            )
        return ArtifactUpload(self, run_id, p, max_bytes)

    def list(self, run_id: str, prefix: str | None = None) -> list[dict[str, Any]]:
        """The run's artifact files (under ``prefix``, a file or directory, when given)."""
        self._require_run(run_id)
        q = sa.select(run_artifacts).where(run_artifacts.c.run_id == run_id)
        if prefix:
            p = check_path(prefix)
            q = q.where(
                (run_artifacts.c.path == p)
                | run_artifacts.c.path.startswith(p + "/", autoescape=True)
            )
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(q.order_by(run_artifacts.c.path))]

    def get(self, run_id: str, path: str, *, required: bool = True) -> dict[str, Any] | None:
        q = sa.select(run_artifacts).where(
            (run_artifacts.c.run_id == run_id) & (run_artifacts.c.path == path)
        )
        with self.engine.connect() as c:
            r = c.execute(q).first()
        if r is None and required:
            raise NotFound(f"run '{run_id}' has no artifact '{path}'", param="path")
        return dict(r._mapping) if r else None

    def open(self, run_id: str, path: str) -> tuple[IO[bytes], int]:
        """The stored file, opened for reading, and its size."""
        a = self.get(run_id, check_path(path))
        assert a is not None
        return self.fs.open(self._fs_path(a["uri"]), "rb"), a["size"]
