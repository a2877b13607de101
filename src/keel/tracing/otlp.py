"""OTLP/HTTP trace ingest: ``POST /v1/traces`` (protobuf or JSON) → the ``spans`` table.

Applications instrumented with OpenTelemetry (or Keel's SDK) send their spans
here; :mod:`keel.tracing.spanmap` turns each into one row (GenAI and
OpenInference conventions mapped, every attribute kept). Also here: the span
metrics (Prometheus), ``GET /api/spans/stats`` and ``GET /api/otel-traces/{id}``.

A request is decoded, mapped and written in one worker thread (the event loop
keeps serving gateway calls) and in one transaction: it is stored whole or not
at all. When the store is down the answer is 503 with ``Retry-After``, which
OTLP exporters retry, so nothing is lost silently; duplicates of
(trace_id, span_id) from such retries are ignored.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import operator
import re
import time
import zlib
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter, Query, Request
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BaseModel, Field
from sqlalchemy import and_, case, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from starlette.responses import Response

from keel._body import read_body
from keel.errors import InvalidRequest, KeelError, PayloadTooLarge, StoreUnavailable
from keel.store.tables import spans
from keel.tracing.spanmap import KNOWN_KINDS, RETRIEVAL_KINDS, decode_json, decode_protobuf
from keel.tracing.tree import trace_tree

log = logging.getLogger("keel.otlp")

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
RETRY_AFTER_S = 1
_PB_TYPES = frozenset({PROTOBUF, "application/protobuf", "application/vnd.google.protobuf"})
_PB_EMPTY_RESPONSE = ExportTraceServiceResponse().SerializeToString()

_WINDOW = re.compile(r"^(\d+)\s*(s|m|h|d|w)$")
_WINDOW_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

_OTLP_SCHEMA = {
    "requestBody": {
        "required": True,
        "description": "An OTLP `ExportTraceServiceRequest` (opentelemetry-proto, trace/v1), "
        "as protobuf or as OTLP JSON (trace and span ids as hex strings). "
        "`Content-Encoding: gzip` or `deflate` is accepted.",
        "content": {
            PROTOBUF: {"schema": {"type": "string", "format": "binary"}},
            JSON: {
                "schema": {
                    "type": "object",
                    "required": ["resourceSpans"],
                    "properties": {
                        "resourceSpans": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "resource": {"type": "object"},
                                    "scopeSpans": {"type": "array", "items": {"type": "object"}},
                                },
                            },
                        }
                    },
                }
            },
        },
    },
    "responses": {
        "200": {"description": "Stored (an empty ExportTraceServiceResponse)."},
        "400": {"description": "Undecodable body, wrong content type or invalid ids."},
        "413": {"description": "Body larger than gateway.max_body_bytes."},
        "503": {"description": "Store unavailable; retry after `Retry-After` seconds."},
    },
}


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise InvalidRequest(
            f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none",
            param="Content-Encoding",
        )
    # wbits 32+15 detects gzip or zlib headers; the cap stops decompression bombs.
    d = zlib.decompressobj(32 + zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidRequest(f"the body is not valid {encoding} data: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise PayloadTooLarge(
            f"the decompressed body exceeds the limit of {limit} bytes (gateway.max_body_bytes)"
        )
    return out


# -- store ------------------------------------------------------------------


def _insert_ignoring_duplicates(engine: Engine) -> Any:
    name = engine.dialect.name
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:  # pragma: no cover - Keel supports SQLite and PostgreSQL
        return None
    return insert(spans).on_conflict_do_nothing(index_elements=["trace_id", "span_id"])


def _store_down(e: BaseException) -> bool:
    return isinstance(
        e, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError
    ) or bool(getattr(e, "connection_invalidated", False))


class SpanMetrics:
    """Prometheus metrics of ingested spans (``kind`` label bounded by :data:`KNOWN_KINDS`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ingested = Counter(
            "keel_spans_ingested", "Spans stored from OTLP, by kind.", ["kind"], registry=registry
        )
        self.retrieval_duration = Histogram(
            "keel_retrieval_duration_seconds",
            "Duration of retrieval and vector-db spans.",
            ["kind", "service"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.retrieval_results = Histogram(
            "keel_retrieval_results",
            "Results returned by retrieval and vector-db spans.",
            ["kind"],
            buckets=(0, 1, 2, 3, 5, 10, 20, 50, 100, 1000),
            registry=registry,
        )
        self.retrieval_empty = Counter(
            "keel_retrieval_empty",
            "Retrieval and vector-db spans that returned no result.",
            ["kind"],
            registry=registry,
        )
        self.retrieval_top_score = Histogram(
            "keel_retrieval_top_score",
            "Best score of retrieval and vector-db spans.",
            ["kind"],
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0, 2, 5, 10, 100),
            registry=registry,
        )

    def observe(self, rows: list[dict[str, Any]]) -> None:
        kinds = collections.Counter(r["kind"] for r in rows)
        for kind, n in kinds.items():
            self.ingested.labels(kind if kind in KNOWN_KINDS else "custom").inc(n)
            if kind not in RETRIEVAL_KINDS:
                continue
            for r in rows:
                if r["kind"] != kind:
                    continue
                self.retrieval_duration.labels(kind, (r["service"] or "")[:100]).observe(
                    r["duration_ms"] / 1000
                )
                if r["result_count"] is not None:
                    self.retrieval_results.labels(kind).observe(r["result_count"])
                    if r["result_count"] == 0:
                        self.retrieval_empty.labels(kind).inc()
                if r["top_score"] is not None:
                    self.retrieval_top_score.labels(kind).observe(r["top_score"])


class OtlpIngest:
    """``POST /v1/traces``: decode, map and write one export request."""

    def __init__(self, engine: Engine, registry: CollectorRegistry, max_body_bytes: int) -> None:
        self.engine = engine
        self.max_body = max_body_bytes
        self.metrics = SpanMetrics(registry)
        self._insert = _insert_ignoring_duplicates(engine)
        # The statement is compiled once and run with the driver's executemany:
        # SQLAlchemy's per-row parameter processing would cost a third of the
        # write (bench/otlp_ingest.py); the rows already hold plain values.
        self._sql: str | None = None
        self._params: Any = None
        if self._insert is not None:
            compiled = self._insert.compile(dialect=engine.dialect)
            self._sql = str(compiled)
            if compiled.positiontup:
                getter = operator.itemgetter(*compiled.positiontup)
                self._params = lambda rows: [getter(r) for r in rows]
            else:
                self._params = lambda rows: rows

    def _write(self, rows: list[dict[str, Any]]) -> None:
        # Retries of a batch and repeats inside one are both ignored.
        unique = list({(r["trace_id"], r["span_id"]): r for r in rows}.values())
        with self.engine.begin() as conn:
            for i in range(0, len(unique), 2000):
                chunk = unique[i : i + 2000]
                if self._sql is None:  # pragma: no cover - other dialects
                    conn.execute(spans.insert(), chunk)
                else:
                    conn.exec_driver_sql(self._sql, self._params(chunk))

    def process(self, body: bytes, is_json: bool, encoding: str) -> list[dict[str, Any]]:
        """Decode, map and write (in a worker thread). Raises KeelError on bad input."""
        body = _decompress(body, encoding, self.max_body)
        rows = decode_json(body) if is_json else decode_protobuf(body)
        if rows:
            try:
                self._write(rows)
            except sa_exc.SQLAlchemyError as e:
                if _store_down(e):
                    raise StoreUnavailable(
                        f"the store is unavailable ({type(e.orig or e).__name__}); "
                        "the spans were not stored, retry later",
                        code="store_unavailable",
                    ) from e
                raise
        return rows

    async def _read(self, request: Request) -> bytes:
        return await read_body(request, self.max_body)

    async def handle(self, request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        is_json = ctype == JSON
        try:
            if not is_json and ctype not in _PB_TYPES:
                raise InvalidRequest(
                    f"Content-Type must be {PROTOBUF} or {JSON} (OTLP/HTTP); "
                    f"got {ctype or 'none'!r}",
                    param="Content-Type",
                    code="unsupported_content_type",
                )
            body = await self._read(request)
            encoding = request.headers.get("content-encoding", "").strip().lower()
            rows = await asyncio.to_thread(self.process, body, is_json, encoding)
        except StoreUnavailable as e:
            log.warning("OTLP ingest: %s", e.message)
            return _error(e, {"Retry-After": str(RETRY_AFTER_S)})
        except KeelError as e:
            return _error(e)
        try:
            self.metrics.observe(rows)
        except Exception:  # metrics never fail a stored batch
            log.exception("span metrics update failed")
        if is_json:
            return Response(b"{}", media_type=JSON)
        return Response(_PB_EMPTY_RESPONSE, media_type=PROTOBUF)


def _error(err: KeelError, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(err.to_body()), status_code=err.status, media_type=JSON, headers=headers
    )


# -- stats ------------------------------------------------------------------


class SpanStats(BaseModel):
    kind: str
    window: str
    service: str | None = None
    since: datetime = Field(description="Start of the window (UTC).")
    count: int = Field(description="Spans of this kind that started in the window.")
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_mean_ms: float | None = None
    with_result_count: int = Field(0, description="Spans that reported a result count.")
    mean_result_count: float | None = None
    empty_result_rate: float | None = Field(
        None, description="Share of the spans reporting a result count that returned none."
    )
    mean_top_score: float | None = None
    min_top_score: float | None = None
    max_top_score: float | None = None


def span_stats(
    engine: Engine, kind: str, window: str = "1h", service: str | None = None
) -> dict[str, Any]:
    """Latency, result counts and scores of the spans of one kind over a recent window."""
    m = _WINDOW.match(window.strip())
    if not m:
        raise InvalidRequest(
            f"'window' must be an age like 15m, 1h, 7d; got {window!r}", param="window"
        )
    now_us = time.time_ns() // 1000
    since_us = now_us - int(m.group(1)) * _WINDOW_S[m.group(2)] * 1_000_000
    cond = and_(spans.c.kind == kind, spans.c.start_us >= since_us)
    if service is not None:
        cond = and_(cond, spans.c.service == service)
    c = spans.c
    agg = select(
        func.count(),
        func.avg(c.duration_ms),
        func.count(c.result_count),
        func.avg(c.result_count),
        func.sum(case((c.result_count == 0, 1), else_=0)),
        func.avg(c.top_score),
        func.min(c.top_score),
        func.max(c.top_score),
    ).where(cond)
    with engine.connect() as conn:
        n, lat_mean, n_res, mean_res, empty, mean_top, min_top, max_top = conn.execute(agg).one()

        def pct(q: float) -> float | None:
            if not n:
                return None
            rank = max(0, math.ceil(q * n) - 1)
            stmt = select(c.duration_ms).where(cond).order_by(c.duration_ms).offset(rank).limit(1)
            return conn.execute(stmt).scalar()

        p50, p95 = pct(0.5), pct(0.95)
    return {
        "kind": kind,
        "window": window,
        "service": service,
        "since": datetime.fromtimestamp(since_us / 1e6, UTC),
        "count": n,
        "latency_p50_ms": p50,
        "latency_p95_ms": p95,
        "latency_mean_ms": float(lat_mean) if lat_mean is not None else None,
        "with_result_count": n_res,
        "mean_result_count": float(mean_res) if mean_res is not None else None,
        "empty_result_rate": (int(empty or 0) / n_res) if n_res else None,
        "mean_top_score": float(mean_top) if mean_top is not None else None,
        "min_top_score": min_top,
        "max_top_score": max_top,
    }


# -- router -----------------------------------------------------------------


def make_router(engine: Engine, registry: CollectorRegistry, max_body_bytes: int) -> APIRouter:
    """``POST /v1/traces``, ``GET /api/spans/stats`` and ``GET /api/otel-traces/{id}``."""
    ingest = OtlpIngest(engine, registry, max_body_bytes)
    r = APIRouter()
    r.add_api_route(
        "/v1/traces",
        ingest.handle,
        methods=["POST"],
        tags=["tracing"],
        summary="Ingest OpenTelemetry spans (OTLP/HTTP, protobuf or JSON)",
        openapi_extra=_OTLP_SCHEMA,
        response_class=Response,
    )

    @r.get(
        "/api/spans/stats",
        response_model=SpanStats,
        tags=["tracing"],
        summary="Latency, result counts and scores of retrieval (or any kind of) spans",
    )
    def _stats(
        kind: str = Query("retrieval", max_length=32, description="retrieval, vector-db, …"),
        window: str = Query("1h", description="An age: 15m, 1h, 24h, 7d."),
        service: str | None = Query(None, description="Only spans of this service."),
    ) -> dict[str, Any]:
        return span_stats(engine, kind, window, service)

    @r.get(
        "/api/otel-traces/{trace_id}",
        tags=["traces"],
        summary="A whole trace as a tree: gateway calls and application spans",
    )
    def _tree(trace_id: str) -> dict[str, Any]:
        return trace_tree(engine, trace_id)

    return r
