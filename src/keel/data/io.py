"""Streaming readers (JSONL, CSV, Parquet, production traces) and the canonical rows.

Every reader is a generator of raw dict rows: nothing is loaded whole, so a
file of any size costs the memory of one batch. :func:`to_canonical` then maps
a raw row into the canonical shape of its kind:

- ``chat``: ``{"messages": [{"role", "content", …}, …], "metadata": {…}}``
- ``completion``: ``{"prompt": str, "completion": str, "metadata": {…}}``
- ``eval``: ``{"input": str | dict, "expected": str | dict | None, "metadata": {…}}``

plus ``"split"`` (``"train"``, ``"validation"``, ``"test"`` or None), which is
stored next to the row, not inside it. Whether the content is *good* (roles,
empty turns, PII, duplicates…) is the validation checks' business; mapping
only refuses rows that cannot take the shape at all.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from typing import Any

import fsspec
import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keel._sampling import sampled
from keel.errors import InvalidRequest
from keel.tracing.bodies import assistant_message

KINDS = ("chat", "completion", "eval")
FORMATS = ("jsonl", "csv", "parquet")
# Columns that hold structured values; in CSV (and string Parquet columns) a
# JSON-looking cell of one of these is parsed.
JSON_FIELDS = frozenset({"messages", "metadata", "input", "expected"})
_FIELDS = {
    "chat": ("messages", "metadata", "split"),
    "completion": ("prompt", "completion", "metadata", "split"),
    "eval": ("input", "expected", "metadata", "split"),
}
BATCH_ROWS = 10_000
TRACE_FILTERS = {"model": "model", "feature": "feature", "user": "user_id", "provider": "provider"}


class DatasetError(InvalidRequest, ValueError):
    """Input that cannot become a dataset; the message names the row or line and field."""

    code = "invalid_dataset"


def row_text(row: dict[str, Any]) -> bytes:
    """The canonical JSON text of a row (sorted keys, no ``split``): what is hashed and stored."""
    if "split" in row:
        row = {k: v for k, v in row.items() if k != "split"}
    return orjson.dumps(row, option=orjson.OPT_SORT_KEYS)


def detect_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise DatasetError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
        return fmt
    lower = path.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        lower = lower.removesuffix(suffix)
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if lower.endswith((".csv", ".tsv")):
        return "csv"
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    raise DatasetError(
        f"cannot tell the format of {path!r} from its name; pass --format jsonl|csv|parquet"
    )


def parse_mapping(pairs: list[str] | tuple[str, ...] | dict[str, str] | None) -> dict[str, str]:
    """``["input=question", "expected=answer"]`` → ``{"input": "question", …}`` (target=source)."""
    if not pairs:
        return {}
    if isinstance(pairs, dict):
        return dict(pairs)
    out: dict[str, str] = {}
    for p in pairs:
        target, sep, source = p.partition("=")
        if not sep or not target.strip() or not source.strip():
            raise DatasetError(f"--map takes FIELD=COLUMN (e.g. input=question), not {p!r}")
        out[target.strip()] = source.strip()
    return out


def _open(path: str, mode: str = "rb") -> Any:
    if not path.startswith(("memory://", "s3://", "gs://", "file://")) and "://" not in path:
        if not os.path.exists(path):
            raise DatasetError(f"no such file: {path}")
    try:
        return fsspec.open(path, mode, compression="infer")
    except (FileNotFoundError, ValueError) as e:
        raise DatasetError(f"cannot open {path}: {e}") from None


def read_jsonl(path: str) -> Iterator[dict[str, Any]]:
    """One JSON object per line; blank lines are skipped; a bad line stops the read."""
    with _open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise DatasetError(f"{path}: line {n} is not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}: line {n} is not a JSON object")
            yield obj


def _maybe_json(v: Any) -> Any:
    if isinstance(v, str) and v[:1] in ("{", "["):
        try:
            return orjson.loads(v)
        except orjson.JSONDecodeError:
            return v
    return v


def read_csv(path: str, json_columns: frozenset[str] = JSON_FIELDS) -> Iterator[dict[str, Any]]:
    """Rows of a CSV (or TSV) file with a header; JSON-looking structured cells are parsed."""
    delimiter = "\t" if path.lower().removesuffix(".gz").endswith(".tsv") else ","
    with _open(path) as fb:
        f = io.TextIOWrapper(fb, encoding="utf-8-sig", newline="")
        reader = csv.DictReader(f, delimiter=delimiter)
        for rec in reader:
            if None in rec:
                raise DatasetError(f"{path}: line {reader.line_num} has more cells than the header")
            yield {k: (_maybe_json(v) if k in json_columns else v) for k, v in rec.items()}


def read_parquet(path: str, json_columns: frozenset[str] = JSON_FIELDS) -> Iterator[dict[str, Any]]:
    """Rows of a Parquet file, a batch at a time. Keel's own files (``row``, ``split``) too."""
    import pyarrow.parquet as pq

    with _open(path) as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        own = names == {"row", "split"}
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            for rec in batch.to_pylist():
                if own:
                    row = orjson.loads(rec["row"])
                    row["split"] = rec["split"]
                    yield row
                else:
                    yield {k: (_maybe_json(v) if k in json_columns else v) for k, v in rec.items()}


def read_file(
    path: str, *, fmt: str = "auto", mapping: dict[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    """Raw rows of a JSONL, CSV or Parquet file (a path or fsspec URL), renamed by ``mapping``."""
    fmt = detect_format(path, fmt)
    mapping = mapping or {}
    json_cols = JSON_FIELDS | {src for tgt, src in mapping.items() if tgt in JSON_FIELDS}
    if fmt == "jsonl":
        rows = read_jsonl(path)
    elif fmt == "csv":
        rows = read_csv(path, json_cols)
    else:
        rows = read_parquet(path, json_cols)
    if not mapping:
        yield from rows
        return
    for raw in rows:
        yield apply_mapping(raw, mapping)


def apply_mapping(raw: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    out = dict(raw)
    for target, source in mapping.items():
        if source in raw:
            out.pop(source, None)
            out[target] = raw[source]
    return out


def _metadata(raw: dict[str, Any], kind: str, n: int) -> dict[str, Any]:
    meta = raw.get("metadata")
    if meta is None or meta == "":
        meta = {}
    if not isinstance(meta, dict):
        raise DatasetError(f"row {n}: 'metadata' must be an object, not {type(meta).__name__}")
    known = _FIELDS[kind]
    extra = {k: v for k, v in raw.items() if k not in known and k not in meta}
    return {**meta, **extra} if extra else meta


def _split(raw: dict[str, Any], n: int) -> str | None:
    s = raw.get("split")
    if s is None or s == "":
        return None
    if not isinstance(s, str):
        raise DatasetError(f"row {n}: 'split' must be a string")
    return s


def to_canonical(raw: dict[str, Any], kind: str, n: int = 0) -> dict[str, Any]:
    """Map a raw row into the canonical shape of ``kind``; ``n`` (1-based) names it in errors.

    Columns that are not fields of the kind go into ``metadata``. Raises
    :class:`DatasetError` (a ``ValueError``-like ``InvalidRequest``) naming the
    row and field when a required field is missing or of an unusable type.
    """
    if kind == "chat":
        msgs = raw.get("messages")
        if msgs is None:
            raise DatasetError(f"row {n}: missing field 'messages' (map one with --map)")
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise DatasetError(f"row {n}: 'messages' must be a list of message objects")
        row: dict[str, Any] = {"messages": msgs}
    elif kind == "completion":
        row = {}
        for f in ("prompt", "completion"):
            v = raw.get(f)
            if v is None:
                raise DatasetError(f"row {n}: missing field {f!r} (map one with --map)")
            if isinstance(v, int | float) and not isinstance(v, bool):
                v = str(v)
            if not isinstance(v, str):
                raise DatasetError(f"row {n}: {f!r} must be a string")
            row[f] = v
    elif kind == "eval":
        inp = raw.get("input")
        if inp is None:
            raise DatasetError(f"row {n}: missing field 'input' (map one with --map)")
        exp = raw.get("expected", raw.get("expected_output"))
        if exp == "":
            exp = None
        # Other JSON values (numbers, lists) are kept: whether they are fit is for the checks.
        row = {"input": inp, "expected": exp}
        raw = {k: v for k, v in raw.items() if k != "expected_output"}
    else:
        raise DatasetError(f"unknown dataset kind {kind!r}; use one of {', '.join(KINDS)}")
    row["metadata"] = _metadata(raw, kind, n)
    row["split"] = _split(raw, n)
    return row


def canonical_rows(raw_rows: Iterator[dict[str, Any]], kind: str) -> Iterator[dict[str, Any]]:
    for n, raw in enumerate(raw_rows, 1):
        yield to_canonical(raw, kind, n)


# -- production traces ----------------------------------------------------------


def from_traces(
    engine: Engine,
    *,
    filters: dict[str, str] | None = None,
    since: int | None = None,
    until: int | None = None,
    kind: str = "chat",
    stats: dict[str, int] | None = None,
    sample: float = 1.0,
    limit: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Canonical rows from successful chat traces, oldest first, streamed from the store.

    ``filters``: ``model``, ``feature``, ``user``, ``provider`` → exact match. Without a
    ``feature`` filter, Keel's own calls (features ``keel:…``, ``eval:…``) are left out.
    ``since``/``until``: epoch ms. ``kind`` ``chat`` gives the request messages
    plus the answer; ``eval`` gives ``input={"messages": …}`` and the answer's
    content as ``expected``. Traces without a usable body (not captured,
    truncated) are skipped and counted in ``stats["skipped"]``. ``sample`` keeps that
    share of the traces (deterministic by trace id); ``limit`` stops after that many rows.
    """
    from keel.store.tables import traces as t

    if kind not in ("chat", "eval"):
        raise DatasetError(f"traces import as 'chat' or 'eval' datasets, not {kind!r}")
    conds = [t.c.status == "ok", t.c.endpoint == "chat"]
    for key, value in (filters or {}).items():
        col = TRACE_FILTERS.get(key)
        if col is None:
            raise DatasetError(
                f"unknown trace filter {key!r}; use one of {', '.join(sorted(TRACE_FILTERS))}"
            )
        conds.append(t.c[col] == value)
    if "feature" not in (filters or {}):
        # Keel's own calls (judges, labellers, experiments) are not production traffic.
        own = sa.or_(t.c.feature.like("keel:%"), t.c.feature.like("eval:%"))
        conds.append(sa.or_(t.c.feature.is_(None), sa.not_(own)))
    if since is not None:
        conds.append(t.c.started_at_ms >= since)
    if until is not None:
        conds.append(t.c.started_at_ms < until)
    q = (
        sa.select(t.c.id, t.c.model, t.c.user_id, t.c.feature, t.c.request_body, t.c.response_body)
        .where(*conds)
        .order_by(t.c.started_at_ms, t.c.id)
    )
    if not 0 < sample <= 1:
        raise DatasetError(f"sample must be in (0, 1], not {sample}")
    stats = stats if stats is not None else {}
    stats.setdefault("skipped", 0)
    n = 0
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=1000).execute(q)
        for r in result:
            if limit is not None and n >= limit:
                break
            if sample < 1 and not sampled(r.id, sample):
                continue
            try:
                req = orjson.loads(r.request_body) if r.request_body else None
                resp = orjson.loads(r.response_body) if r.response_body else None
            except orjson.JSONDecodeError:
                req = resp = None
            msgs = req.get("messages") if isinstance(req, dict) else None
            answer = assistant_message(resp)
            if not isinstance(msgs, list) or answer is None:
                stats["skipped"] += 1
                continue
            meta = {"trace_id": r.id, "model": r.model, "user": r.user_id, "feature": r.feature}
            n += 1
            if kind == "chat":
                yield {"messages": [*msgs, answer], "metadata": meta, "split": None}
            else:
                yield {
                    "input": {"messages": msgs},
                    "expected": answer.get("content"),
                    "metadata": meta,
                    "split": None,
                }


# -- export ---------------------------------------------------------------------


def _text(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    return orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()


_S = {"dtype": "string", "_type": "Value"}
_MSG_FIELDS = ("role", "content", "name", "tool_call_id", "tool_calls")


def _arrow_schema(kind: str) -> Any:
    import pyarrow as pa

    s = pa.string()
    if kind == "chat":
        msg = pa.struct([(f, s) for f in _MSG_FIELDS])
        cols = [("messages", pa.list_(msg)), ("metadata", s)]
    elif kind == "completion":
        cols = [("prompt", s), ("completion", s), ("metadata", s)]
    else:
        cols = [("input", s), ("expected", s), ("metadata", s)]
    return pa.schema([*cols, ("split", s)])


def _hf_features(kind: str) -> dict[str, Any]:
    if kind == "chat":
        feats: dict[str, Any] = {"messages": [{f: _S for f in _MSG_FIELDS}], "metadata": _S}
    else:
        names = ("prompt", "completion") if kind == "completion" else ("input", "expected")
        feats = {**{n: _S for n in names}, "metadata": _S}
    return {**feats, "split": _S}


def _flat(row: dict[str, Any], kind: str) -> dict[str, Any]:
    """A row with one column per field; structured values as canonical JSON text."""
    out = {"metadata": _text(row.get("metadata") or {}), "split": row.get("split")}
    if kind == "chat":
        out["messages"] = [
            {f: _text(m.get(f)) for f in _MSG_FIELDS}
            if isinstance(m, dict)
            else {"content": _text(m)}
            for m in row.get("messages") or []
        ]
    elif kind == "completion":
        out["prompt"], out["completion"] = row.get("prompt"), row.get("completion")
    else:
        out["input"], out["expected"] = _text(row.get("input")), _text(row.get("expected"))
    return out


def _openai_line(row: dict[str, Any], kind: str) -> dict[str, Any]:
    if kind == "chat":
        return {"messages": row["messages"]}
    if kind == "completion":
        return {"prompt": row["prompt"], "completion": row["completion"]}
    raise DatasetError(
        "an eval dataset has no OpenAI fine-tuning form; export it as jsonl, parquet or hf"
    )


def write_export(
    kind: str,
    rows: Iterator[dict[str, Any]],
    fmt: str,
    dest: str,
    *,
    split: str | None,
    splits: dict[str, int],
    info: dict[str, Any],
) -> list[str]:
    """Stream rows of one version into ``fmt`` at ``dest``; see ``DatasetStore.export``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(dest)
    prefix = dest.split("://", 1)[0] + "://" if "://" in dest else ""
    written: list[str] = []
    handles: dict[str, Any] = {}
    writers: dict[str, Any] = {}
    buffers: dict[str, list[dict[str, Any]]] = {}
    schema = _arrow_schema(kind)
    counts: dict[str, int] = {}

    def open_file(path: str) -> Any:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        written.append(prefix + path)
        return fs.open(path, "wb")

    def flush(key: str) -> None:
        if buffers.get(key):
            writers[key].write_table(pa.Table.from_pylist(buffers[key], schema=schema))
            buffers[key] = []

    try:
        per_split = fmt == "hf" or (fmt in ("jsonl", "openai-jsonl") and split is None and splits)
        for row in rows:
            key = (row.get("split") or "train") if per_split else ""
            counts[key] = counts.get(key, 0) + 1
            if fmt in ("jsonl", "openai-jsonl"):
                f = handles.get(key)
                if f is None:
                    f = handles[key] = open_file(f"{root}/{key}.jsonl" if key else root)
                obj = _openai_line(row, kind) if fmt == "openai-jsonl" else row
                f.write(orjson.dumps(obj) + b"\n")
                continue
            if key not in writers:
                path = f"{root}/{key}/data-00000.parquet" if fmt == "hf" else root
                handles[key] = open_file(path)
                writers[key] = pq.ParquetWriter(handles[key], schema, compression="zstd")
            buffers.setdefault(key, []).append(_flat(row, kind))
            if len(buffers[key]) >= BATCH_ROWS:
                flush(key)
        if not counts and fmt != "hf":  # an empty export is still a (valid, empty) file
            handles[""] = open_file(root)
            if fmt == "parquet":
                writers[""] = pq.ParquetWriter(handles[""], schema)
        for key in writers:
            flush(key)
            writers[key].close()
        if fmt == "hf":
            meta = {
                "description": f"Keel dataset {info['dataset']}, version {info['version']}",
                "features": _hf_features(kind),
                "splits": {k: {"name": k, "num_examples": n} for k, n in sorted(counts.items())},
                "keel": {**info, "kind": kind},
            }
            fs.makedirs(root, exist_ok=True)
            with fs.open(f"{root}/dataset_info.json", "wb") as f:
                f.write(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
            written.append(prefix + f"{root}/dataset_info.json")
    finally:
        for h in handles.values():
            h.close()
    return written
