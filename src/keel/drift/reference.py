"""The two sides of a drift comparison: features of a window of traffic, or of a dataset.

A :class:`Sample` holds the features of one side as arrays: numeric features
(NaN where missing), categorical ones (None where missing) and a random sample
of the embeddings with the input texts of the same traces (for examples).

A reference is a dataset version (its rows are featurized on the fly, with the
same extraction and embedder as traces), a fixed period, or the same window a
week earlier (:func:`reference_sample`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from sqlalchemy import select
from sqlalchemy.engine import Engine

from keel.config import DriftMonitorSettings, DriftSettings
from keel.config.quality import DRIFT_NUMERIC
from keel.drift.features import Embedder, decode_vectors, text_features
from keel.errors import ConfigError, KeelError
from keel.store.tables_quality import trace_features
from keel.tracing.bodies import content_text, last_user_text

WEEK_MS = 7 * 86_400_000
_IN_CHUNK = 500

Progress = Callable[[int], None]


@dataclass
class Sample:
    """The drift features of one side of a comparison."""

    n: int
    numeric: dict[str, np.ndarray] = field(default_factory=dict)
    categorical: dict[str, list[str | None]] = field(default_factory=dict)
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    #: the input text of each embedded row, per embedding feature (for examples)
    texts: dict[str, list[str | None]] = field(default_factory=dict)
    #: what this side is: kind, window or dataset version
    source: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: why a feature has no values on this side, when it is known
    missing: dict[str, str] = field(default_factory=dict)


def _rng(*parts: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(parts).encode()))


def load_window(
    engine: Engine,
    start_ms: int,
    end_ms: int,
    settings: DriftSettings,
    monitor: DriftMonitorSettings | None = None,
) -> Sample:
    """Features of the traces started in [start_ms, end_ms) (the newest ``max_rows``),
    with up to ``embedding_rows`` embeddings drawn at random."""
    t = trace_features
    conds = [t.c.started_at_ms >= start_ms, t.c.started_at_ms < end_ms]
    if monitor is not None and monitor.models:
        conds.append(t.c.model.in_(monitor.models))
    if monitor is not None and monitor.features:
        conds.append(t.c.feature.in_(monitor.features))
    cols = [t.c[c] for c in (*DRIFT_NUMERIC, "language", "refusal", "model")]
    q = (
        select(
            t.c.trace_id,
            *cols,
            t.c.input_embedding.isnot(None).label("has_in"),
            t.c.output_embedding.isnot(None).label("has_out"),
        )
        .where(*conds)
        .order_by(t.c.started_at_ms.desc())
        .limit(settings.max_rows)
    )
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    n = len(rows)
    sample = Sample(n=n, source={"start_ms": start_ms, "end_ms": end_ms})
    if n >= settings.max_rows:
        sample.notes.append(f"the newest {n} traces of the window were read (drift.max_rows)")
    cols = list(zip(*rows, strict=True)) if rows else [()] * (len(DRIFT_NUMERIC) + 6)
    for j, name in enumerate(DRIFT_NUMERIC, start=1):
        sample.numeric[name] = np.array(cols[j], dtype=np.float64)  # None becomes NaN
    base = 1 + len(DRIFT_NUMERIC)
    sample.categorical["language"] = list(cols[base])
    refusal = {None: None, True: "true", False: "false"}  # 1/0 hash as True/False
    sample.categorical["refusal"] = [refusal[v] for v in cols[base + 1]]
    sample.categorical["model"] = list(cols[base + 2])
    with_emb = [tid for tid, a, b in zip(cols[0], cols[-2], cols[-1], strict=True) if a or b]
    if not with_emb:
        return sample
    if len(with_emb) > settings.embedding_rows:
        pick = _rng(start_ms, end_ms).choice(len(with_emb), settings.embedding_rows, replace=False)
        with_emb = [with_emb[i] for i in sorted(pick)]
    q2 = select(t.c.trace_id, t.c.input_text, t.c.input_embedding, t.c.output_embedding)
    got: list[Any] = []
    with engine.connect() as conn:
        for i in range(0, len(with_emb), _IN_CHUNK):
            got.extend(conn.execute(q2.where(t.c.trace_id.in_(with_emb[i : i + _IN_CHUNK]))))
    for name, col in (("input_embedding", 2), ("output_embedding", 3)):
        have = [r for r in got if r[col]]
        if have:
            try:
                sample.embeddings[name] = decode_vectors([r[col] for r in have])
            except ValueError:  # vectors of different lengths: the model changed midway
                sample.notes.append(f"{name}: stored vectors differ in length; skipped")
                continue
            sample.texts[name] = [r.input_text for r in have]
    return sample


# -- dataset references ---------------------------------------------------------------------


def dataset_texts(row: dict[str, Any]) -> tuple[str | None, str | None]:
    """(input text, output text) of a canonical dataset row (chat, completion or eval)."""
    if "messages" in row:
        msgs = [m for m in row.get("messages") or [] if isinstance(m, dict)]
        answer = None
        if msgs and msgs[-1].get("role") == "assistant":
            answer = content_text(msgs[-1].get("content"))
            msgs = msgs[:-1]
        return last_user_text(msgs), answer
    if "prompt" in row:
        return row.get("prompt"), row.get("completion")
    inp, exp = row.get("input"), row.get("expected")
    if isinstance(inp, dict) and isinstance(inp.get("messages"), list):
        text = last_user_text(inp["messages"])
    elif inp is None or isinstance(inp, str):
        text = inp
    else:
        text = orjson.dumps(inp).decode()
    return text, exp if isinstance(exp, str) else None


def _reservoir(rows: Iterator[dict[str, Any]], k: int, rng: np.random.Generator) -> list[dict]:
    """A uniform sample of k rows of a stream (datasets are often sorted by topic)."""
    out: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        if i < k:
            out.append(row)
        else:
            j = int(rng.integers(i + 1))
            if j < k:
                out[j] = row
    return out


def dataset_sample(
    datasets: Any,
    ref: str,
    settings: DriftSettings,
    embedder: Embedder,
    *,
    progress: Progress | None = None,
) -> Sample:
    """Features of (a uniform sample of ``dataset_rows``) rows of a dataset version."""
    version = datasets.get(ref)
    rows = _reservoir(datasets.read_rows(version), settings.dataset_rows, _rng(version.id))
    mc = settings.max_text_chars
    inputs, outputs = [], []
    for row in rows:
        i, o = dataset_texts(row)
        inputs.append(i[:mc] if isinstance(i, str) else None)
        outputs.append(o[:mc] if isinstance(o, str) else None)
    sample = Sample(
        n=len(rows),
        source={"dataset": version.dataset, "version": version.id, "rows": version.rows},
    )
    if len(rows) < version.rows:
        sample.notes.append(f"a random {len(rows)} of the dataset's {version.rows} rows were used")
    # Traces carry the model's own token counts; a dataset only text. An estimate
    # (chars/4) against real counts would show a shift that is not there.
    nan = np.full(len(rows), np.nan)
    sample.numeric = {name: nan for name in DRIFT_NUMERIC}
    no_tokens = "a dataset has no token counts comparable with the model's"
    sample.missing = {
        "input_tokens": no_tokens,
        "output_tokens": no_tokens,
        "latency_ms": "a dataset has no latency",
        "retrieval_top_score": "a dataset has no retrieval spans",
        "retrieval_count": "a dataset has no retrieval spans",
        "model": "a dataset row has no model",
    }
    feats = [text_features(i, o, mc) for i, o in zip(inputs, outputs, strict=True)]
    sample.categorical = {
        "language": [f["language"] for f in feats],
        "refusal": [None if f["refusal"] is None else str(f["refusal"]).lower() for f in feats],
        "model": [None] * len(rows),
    }
    if settings.embeddings:
        ex = settings.example_chars
        for name, texts in (("input_embedding", inputs), ("output_embedding", outputs)):
            idx = [k for k, x in enumerate(texts) if x and x.strip()]
            if not idx or not embedder.available:
                continue
            vecs = []
            for s in range(0, len(idx), 256):
                part = idx[s : s + 256]
                vecs.append(embedder.embed([texts[k] or "" for k in part]))
                if progress is not None:
                    progress(len(part))
            sample.embeddings[name] = np.vstack(vecs)  # type: ignore[arg-type]
            sample.texts[name] = [(inputs[k] or "")[:ex] or None for k in idx]
    return sample


# -- choosing the reference ----------------------------------------------------------------


def reference_span(monitor: DriftMonitorSettings, start_ms: int, end_ms: int) -> tuple[int, int]:
    """[start, end) of a period or last-week reference."""
    ref = monitor.reference
    if ref.kind == "period":
        return ref.period_ms()
    return start_ms - WEEK_MS, end_ms - WEEK_MS


def reference_sample(
    engine: Engine,
    monitor: DriftMonitorSettings,
    index: int,
    start_ms: int,
    end_ms: int,
    settings: DriftSettings,
    *,
    datasets: Any = None,
    embedder: Embedder | None = None,
    cache: dict[Any, Sample] | None = None,
    progress: Progress | None = None,
) -> Sample:
    """The reference side of a monitor's run over the window [start_ms, end_ms).

    A dataset reference is featurized once per version and kept in ``cache``.
    Errors name the monitor's entry (``drift.monitors.N``)."""
    ref = monitor.reference
    where = f"drift.monitors.{index} ({monitor.name}).reference"
    if ref.kind != "dataset":
        s0, e0 = reference_span(monitor, start_ms, end_ms)
        sample = load_window(engine, s0, e0, settings, monitor)
        sample.source = {"kind": ref.kind, "start_ms": s0, "end_ms": e0}
        return sample
    if datasets is None or embedder is None:
        raise ConfigError(f"{where}: dataset references need the dataset store")
    try:
        version_id = datasets.get(ref.dataset).id
    except KeelError as e:
        raise ConfigError(f"{where}.dataset: {e}") from None
    key = ("dataset", version_id, settings.dataset_rows, settings.embeddings, embedder.available)
    if cache is not None and key in cache:
        return cache[key]
    try:
        sample = dataset_sample(datasets, version_id, settings, embedder, progress=progress)
    except KeelError as e:
        raise ConfigError(f"{where}.dataset: {e}") from None
    sample.source = {"kind": "dataset", "ref": ref.dataset, **sample.source}
    if cache is not None:
        if len(cache) >= 8:  # superseded versions of "NAME" (latest) would pile up
            cache.clear()
        cache[key] = sample
    return sample
