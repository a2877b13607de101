"""Immutable dataset versions: Parquet under the artifact root, metadata in the store.

A version is identified by the SHA-256 of its content: the canonical JSON text
of every row (:func:`keel.data.io.row_text`) and its split label, in order. The
same rows therefore get the same id whatever file or path they came from, and
writing them again writes nothing. The Parquet files (columns ``row``: the
canonical text, ``split``) are written under a staging name while the hash is
computed, then moved to ``<root>/datasets/<name>/<id>/data-00000.parquet``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from tqdm import tqdm

from keel.data.io import BATCH_ROWS, KINDS, DatasetError, row_text, write_export
from keel.errors import Conflict, NotFound
from keel.store.tables import dataset_versions as dv
from keel.store.tables import datasets as ds

SCHEMA = pa.schema([("row", pa.string()), ("split", pa.string())])
EXPORT_FORMATS = ("openai-jsonl", "jsonl", "parquet", "hf")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_HEX = re.compile(r"^[0-9a-f]{4,64}$")
_HASH_DOMAIN = b"keel-dataset-v1\n"


@dataclass
class VersionInfo:
    """One stored version. ``steps`` and ``source`` are its lineage."""

    id: str
    dataset: str
    kind: str
    parent_id: str | None
    rows: int
    splits: dict[str, int]
    uri: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    source: dict[str, Any] | None = None
    created_at_ms: int = 0
    created_by: str | None = None
    validation: dict[str, Any] | None = None
    #: False when :meth:`DatasetStore.write_version` found the version already stored.
    created: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else None


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise DatasetError(
            f"invalid dataset name {name!r}: use letters, digits, '.', '_' and '-' (≤200)"
        )
    return name


class DatasetStore:
    """Dataset versions on ``artifact_root`` (a path or fsspec URL) with metadata in ``engine``."""

    def __init__(self, engine: Engine, artifact_root: str, *, progress: bool = False) -> None:
        self.engine = engine
        self.root = str(artifact_root).rstrip("/")
        self.progress = progress
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root)

    # -- paths -------------------------------------------------------------------

    def _uri(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _path(self, uri: str) -> str:
        return fsspec.core.url_to_fs(uri)[1]

    def _files(self, uri: str) -> list[str]:
        return sorted(self.fs.glob(self._path(uri).rstrip("/") + "/data-*.parquet"))

    # -- writing -----------------------------------------------------------------

    def write_version(
        self,
        name: str,
        kind: str,
        rows: Iterable[dict[str, Any]],
        *,
        parent_id: str | None = None,
        steps: list[dict[str, Any]] | None = None,
        source: dict[str, Any] | None = None,
        created_by: str | None = None,
        description: str | None = None,
        progress: bool | None = None,
        batch_rows: int = BATCH_ROWS,
    ) -> VersionInfo:
        """Stream canonical rows into a new version (or return the identical stored one).

        Rows are hashed and written in batches as they arrive; an error from
        ``rows`` (a bad line) removes what was staged and writes no version.
        """
        check_name(name)
        if kind not in KINDS:
            raise DatasetError(f"unknown dataset kind {kind!r}; use one of {', '.join(KINDS)}")
        existing_kind = self._kind(name)
        if existing_kind is not None and existing_kind != kind:
            raise Conflict(f"dataset '{name}' holds {existing_kind} rows, not {kind}")
        stage = self._uri("datasets", name, f"_staging-{uuid.uuid4().hex}")
        stage_path = self._path(stage)
        self.fs.makedirs(stage_path, exist_ok=True)
        h = hashlib.sha256(_HASH_DOMAIN + kind.encode() + b"\n")
        n = 0
        splits: dict[str, int] = {}
        show = self.progress if progress is None else progress
        bar = tqdm(desc=f"writing {name}", unit=" rows", disable=not show, unit_scale=True)
        try:
            with (
                self.fs.open(stage_path + "/data-00000.parquet", "wb") as f,
                pq.ParquetWriter(f, SCHEMA, compression="zstd") as writer,
            ):
                texts: list[str] = []
                labels: list[str | None] = []
                for row in rows:
                    t = row_text(row)
                    s = row.get("split") or None
                    h.update(b"%d\n" % len(t))
                    h.update(t)
                    h.update(s.encode() + b"\n" if s else b"\x00\n")
                    texts.append(t.decode())
                    labels.append(s)
                    if s:
                        splits[s] = splits.get(s, 0) + 1
                    n += 1
                    if len(texts) >= batch_rows:
                        writer.write_table(pa.table([texts, labels], schema=SCHEMA))
                        bar.update(len(texts))
                        texts, labels = [], []
                if texts or n == 0:
                    writer.write_table(pa.table([texts, labels], schema=SCHEMA))
                    bar.update(len(texts))
        except BaseException:
            self._remove(stage_path)
            raise
        finally:
            bar.close()
        vid = h.hexdigest()
        found = self._get_by_id(vid)
        if found is not None:
            self._remove(stage_path)
            if found.dataset != name:
                raise Conflict(
                    f"these rows are already version {vid[:12]} of dataset '{found.dataset}'"
                )
            found.created = False
            return found
        final = self._uri("datasets", name, vid)
        final_path = self._path(final)
        if self.fs.exists(final_path):  # left by a crash between the move and the insert
            self._remove(final_path)
        self.fs.mv(stage_path, final_path, recursive=True)
        info = VersionInfo(
            id=vid,
            dataset=name,
            kind=kind,
            parent_id=parent_id,
            rows=n,
            splits=splits,
            uri=final,
            steps=steps or [],
            source=source,
            created_at_ms=int(time.time() * 1000),
            created_by=created_by,
        )
        try:
            with self.engine.begin() as c:
                if existing_kind is None:
                    with contextlib.suppress(sa.exc.IntegrityError), c.begin_nested():
                        c.execute(
                            ds.insert().values(
                                name=name,
                                kind=kind,
                                description=description,
                                created_at_ms=info.created_at_ms,
                            )
                        )
                c.execute(
                    dv.insert().values(
                        id=vid,
                        dataset=name,
                        parent_id=parent_id,
                        rows=n,
                        splits=json.dumps(splits, sort_keys=True),
                        uri=final,
                        steps=json.dumps(info.steps),
                        source=json.dumps(source) if source is not None else None,
                        created_at_ms=info.created_at_ms,
                        created_by=created_by,
                    )
                )
        except sa.exc.IntegrityError:
            # Written at the same moment by another process: same rows, same files.
            found = self._get_by_id(vid)
            if found is None:
                raise
            found.created = False
            return found
        return info

    def _remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)

    def set_validation(self, version_id: str, summary: dict[str, Any]) -> None:
        """Record the summary of the latest validation report on a version."""
        with self.engine.begin() as c:
            c.execute(
                dv.update().where(dv.c.id == version_id).values(validation=json.dumps(summary))
            )

    # -- reading -----------------------------------------------------------------

    def _kind(self, name: str) -> str | None:
        with self.engine.connect() as c:
            return c.execute(sa.select(ds.c.kind).where(ds.c.name == name)).scalar()

    def _info(self, r: Any, kind: str) -> VersionInfo:
        return VersionInfo(
            id=r.id,
            dataset=r.dataset,
            kind=kind,
            parent_id=r.parent_id,
            rows=r.rows,
            splits=_loads(r.splits) or {},
            uri=r.uri,
            steps=_loads(r.steps) or [],
            source=_loads(r.source),
            created_at_ms=r.created_at_ms,
            created_by=r.created_by,
            validation=_loads(r.validation),
            created=False,
        )

    def _select(self) -> sa.Select:
        return sa.select(dv, ds.c.kind).join(ds, ds.c.name == dv.c.dataset)

    def _get_by_id(self, vid: str) -> VersionInfo | None:
        with self.engine.connect() as c:
            r = c.execute(self._select().where(dv.c.id == vid)).first()
        return self._info(r, r.kind) if r else None

    def get(self, ref: str | VersionInfo) -> VersionInfo:
        """``name`` (its latest version), ``name@<id prefix>`` or an id (prefix of ≥4 hex)."""
        if isinstance(ref, VersionInfo):
            return ref
        ref = ref.strip()
        name, at, prefix = ref.partition("@")
        q = self._select()
        if at:
            q = q.where(dv.c.dataset == name)
            if prefix not in ("", "latest"):
                q = q.where(dv.c.id.startswith(prefix.lower()))
            else:
                prefix = ""
        elif self._kind(ref) is not None:
            q, prefix = q.where(dv.c.dataset == ref), ""
        elif _HEX.match(ref.lower()):
            prefix = ref.lower()
            q = q.where(dv.c.id.startswith(prefix))
        else:
            raise NotFound(f"no dataset '{ref}' (see `keel data list`)")
        with self.engine.connect() as c:
            rows = c.execute(q.order_by(dv.c.created_at_ms.desc(), dv.c.id).limit(5)).all()
        if not rows:
            raise NotFound(f"no dataset version matches '{ref}' (see `keel data list`)")
        if prefix and len(rows) > 1 and rows[0].id != rows[1].id:
            ids = ", ".join(r.id[:12] for r in rows)
            raise DatasetError(f"'{ref}' is ambiguous ({ids}…); give more of the id")
        return self._info(rows[0], rows[0].kind)

    def list(self) -> list[dict[str, Any]]:
        """Every dataset: name, kind, description, number of versions, latest version."""
        with self.engine.connect() as c:
            named = c.execute(sa.select(ds).order_by(ds.c.name)).all()
            counts = dict(
                c.execute(sa.select(dv.c.dataset, sa.func.count()).group_by(dv.c.dataset)).all()
            )
        out = []
        for d in named:
            latest = None
            if counts.get(d.name):
                latest = self.get(f"{d.name}@latest").to_dict()
            out.append(
                {
                    "name": d.name,
                    "kind": d.kind,
                    "description": d.description,
                    "created_at_ms": d.created_at_ms,
                    "versions": counts.get(d.name, 0),
                    "latest": latest,
                }
            )
        return out

    def versions(self, name: str) -> list[VersionInfo]:
        """The versions of a dataset, newest first."""
        kind = self._kind(name)
        if kind is None:
            raise NotFound(f"no dataset '{name}' (see `keel data list`)")
        with self.engine.connect() as c:
            rows = c.execute(
                self._select()
                .where(dv.c.dataset == name)
                .order_by(dv.c.created_at_ms.desc(), dv.c.id)
            ).all()
        return [self._info(r, kind) for r in rows]

    def read_texts(
        self, ref: str | VersionInfo, split: str | None = None
    ) -> Iterator[tuple[str, str | None]]:
        """``(canonical row text, split)`` pairs of a version, streamed a batch at a time."""
        info = self.get(ref)
        files = self._files(info.uri)
        if not files:
            raise NotFound(f"the files of version {info.id[:12]} are missing at {info.uri}")
        for path in files:
            with self.fs.open(path, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS):
                    texts = batch.column(0).to_pylist()
                    labels = batch.column(1).to_pylist()
                    for t, s in zip(texts, labels, strict=True):
                        if split is None or s == split:
                            yield t, s

    def read_rows(self, ref: str | VersionInfo, split: str | None = None) -> Iterator[dict]:
        """The canonical rows of a version (with ``split``), streamed; only ``split`` if given."""
        for t, s in self.read_texts(ref, split):
            row = orjson.loads(t)
            row["split"] = s
            yield row

    # -- comparing ---------------------------------------------------------------

    def diff(self, a: str | VersionInfo, b: str | VersionInfo, *, examples: int = 3) -> dict:
        """Rows added and removed from ``a`` to ``b``, by content (splits ignored).

        Memory: one 16-byte digest per row of each side.
        """
        va, vb = self.get(a), self.get(b)

        def digest(t: str) -> bytes:
            return hashlib.blake2b(t.encode(), digest_size=16).digest()

        set_a = {digest(t) for t, _ in self.read_texts(va)}
        set_b: set[bytes] = set()
        added, added_ex = 0, []
        for t, _ in self.read_texts(vb):
            d = digest(t)
            set_b.add(d)
            if d not in set_a:
                added += 1
                if len(added_ex) < examples:
                    added_ex.append(orjson.loads(t))
        removed, removed_ex = 0, []
        for t, _ in self.read_texts(va):
            if digest(t) not in set_b:
                removed += 1
                if len(removed_ex) < examples:
                    removed_ex.append(orjson.loads(t))
        return {
            "a": va.id,
            "b": vb.id,
            "rows_a": va.rows,
            "rows_b": vb.rows,
            "unique_a": len(set_a),
            "unique_b": len(set_b),
            "added": added,
            "removed": removed,
            "splits_a": va.splits,
            "splits_b": vb.splits,
            "examples_added": added_ex,
            "examples_removed": removed_ex,
        }

    # -- exporting ---------------------------------------------------------------

    def export(
        self,
        ref: str | VersionInfo,
        fmt: str,
        dest: str,
        *,
        split: str | None = None,
        progress: bool | None = None,
    ) -> list[str]:
        """Write a version to ``dest`` (path or fsspec URL); returns the files written.

        ``openai-jsonl`` / ``jsonl``: one file, or, for a split version exported
        without ``split``, a directory of ``<split>.jsonl``. ``parquet``: one
        file with the kind's columns and ``split``. ``hf``: a Hugging Face
        ``datasets`` layout: ``dest/<split>/data-00000.parquet`` (unsplit rows
        go to ``train``) plus ``dest/dataset_info.json``.
        """
        info = self.get(ref)
        if fmt not in EXPORT_FORMATS:
            raise DatasetError(f"unknown export format {fmt!r}; use {', '.join(EXPORT_FORMATS)}")
        show = self.progress if progress is None else progress
        total = info.splits.get(split, 0) if split else info.rows
        bar = tqdm(desc=f"exporting {info.dataset}", total=total, unit=" rows", disable=not show)
        try:
            rows = _counted(self.read_rows(info, split), bar)
            return write_export(
                info.kind,
                rows,
                fmt,
                dest.rstrip("/"),
                split=split,
                splits=info.splits,
                info={"dataset": info.dataset, "version": info.id, "steps": info.steps},
            )
        finally:
            bar.close()


def _counted(rows: Iterator[dict], bar: tqdm) -> Iterator[dict]:
    for i, r in enumerate(rows, 1):
        yield r
        if i % 1000 == 0:
            bar.update(1000)
    bar.update(bar.total - bar.n if bar.total else 0)
