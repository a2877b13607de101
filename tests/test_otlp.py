"""OTLP/HTTP ingest (`POST /v1/traces`), span stats, metrics and trace trees, on a real Keel."""

from __future__ import annotations

import base64
import gzip
import os
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from conftest import KeelServer, make_settings, set_pg_connections
from keel.testing.fake_upstream import FakeUpstream
from keel.tracing.spanmap import map_span, span_kind
from keel.tracing.tree import build_tree, trace_tree

PB = {"content-type": "application/x-protobuf"}
JS = {"content-type": "application/json"}


class OtlpKeel(KeelServer):
    """A real Keel (create_app includes the OTLP router), with span helpers."""

    def spans(self, where: str = "") -> list[dict[str, Any]]:
        return self.rows("spans", where)

    def post(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return httpx.post(self.url + "/v1/traces", content=body, headers=headers, timeout=30)


def otlp_servers(fake: FakeUpstream, tmp_path: Path) -> Iterator[Any]:
    """Body of the ``otlp_factory`` fixture (test_sdk.py uses it too)."""
    servers: list[OtlpKeel] = []

    def start(**over: Any) -> OtlpKeel:
        s = OtlpKeel(make_settings(fake, tmp_path / f"otlp{len(servers)}", **over)).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def otlp_factory(fake: FakeUpstream, tmp_path: Path) -> Iterator[Any]:
    yield from otlp_servers(fake, tmp_path)


@pytest.fixture
def okeel(otlp_factory: Any) -> OtlpKeel:
    return otlp_factory()


# -- building requests --------------------------------------------------------


def av(v: Any) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    if isinstance(v, bytes):
        return AnyValue(bytes_value=v)
    if isinstance(v, list):
        return AnyValue(array_value=ArrayValue(values=[av(x) for x in v]))
    if isinstance(v, dict):
        return AnyValue(kvlist_value=KeyValueList(values=kvs(v)))
    return AnyValue(string_value=v)


def kvs(d: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=av(v)) for k, v in d.items()]


def pb_span(
    tid: bytes,
    name: str,
    attrs: dict[str, Any],
    *,
    parent: bytes = b"",
    sid: bytes | None = None,
    start_ms: float = 0,
    dur_ms: float = 10,
    code: int = 0,
    message: str = "",
    events: list[tuple[str, dict[str, Any]]] = (),  # type: ignore[assignment]
) -> Span:
    t0 = time.time_ns() - 60_000_000_000 + int(start_ms * 1e6)
    return Span(
        trace_id=tid,
        span_id=sid or os.urandom(8),
        parent_span_id=parent,
        name=name,
        kind=Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=t0,
        end_time_unix_nano=t0 + int(dur_ms * 1e6),
        attributes=kvs(attrs),
        events=[Span.Event(name=n, time_unix_nano=t0, attributes=kvs(a)) for n, a in events],
        status=Status(code=code, message=message),
    )


def pb_request(spans: list[Span], service: str = "shop") -> bytes:
    return ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=kvs({"service.name": service})),
                scope_spans=[ScopeSpans(scope=InstrumentationScope(name="t"), spans=spans)],
            )
        ]
    ).SerializeToString()


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in rows}


def count(server: OtlpKeel) -> int:
    return len(server.spans())


# -- mapping ------------------------------------------------------------------


def test_protobuf_genai_and_openinference_mapped(okeel: OtlpKeel) -> None:
    tid = os.urandom(16)
    root = os.urandom(8)
    spans = [
        pb_span(
            tid,
            "answer",
            {
                "openinference.span.kind": "CHAIN",
                "input.value": "what is the refund policy?",
                "output.value": "30 days",
                "app.user": "u1",
                "app.tags": ["a", "b"],
                "app.meta": {"k": 1, "ok": True},
                "app.blob": b"\x00\x01",
            },
            sid=root,
            dur_ms=100,
        ),
        pb_span(
            tid,
            "chat gpt-4o",
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.system": "openai",
                "gen_ai.request.model": "gpt-4o",
                "gen_ai.response.model": "gpt-4o-2024-08-06",
                "gen_ai.usage.input_tokens": 11,
                "gen_ai.usage.output_tokens": 7,
                "gen_ai.prompt.0.role": "user",
                "gen_ai.prompt.0.content": "hi",
                "gen_ai.completion.0.role": "assistant",
                "gen_ai.completion.0.content": "hello",
                "server.address": "api.openai.com",
            },
            parent=root,
            start_ms=10,
        ),
        pb_span(
            tid,
            "retrieve",
            {
                "openinference.span.kind": "RETRIEVER",
                "input.value": "refund",
                "retrieval.documents.0.document.content": "Returns within 30 days",
                "retrieval.documents.0.document.score": 0.8,
                "retrieval.documents.1.document.content": "Refund in 5 days",
                "retrieval.documents.1.document.score": 0.6,
                "retrieval.documents.2.document.content": "Shipping",
                "retrieval.documents.2.document.score": 0.1,
            },
            parent=root,
            start_ms=5,
        ),
        pb_span(
            tid,
            "embed",
            {
                "openinference.span.kind": "EMBEDDING",
                "embedding.model_name": "all-MiniLM-L6-v2",
            },
            parent=root,
        ),
        pb_span(
            tid,
            "llm oi",
            {
                "openinference.span.kind": "LLM",
                "llm.model_name": "claude-x",
                "llm.token_count.prompt": 20,
                "llm.token_count.completion": 5,
                "llm.input_messages.0.message.role": "user",
                "llm.input_messages.0.message.content": "question",
                "llm.output_messages.0.message.content": "answer",
            },
            parent=root,
        ),
        pb_span(tid, "qdrant search", {"db.system": "qdrant", "keel.result_count": 0}, parent=root),
        pb_span(
            tid,
            "redis knn",
            {"db.system": "redis", "db.operation": "FT.SEARCH", "db.response.returned_rows": 4},
            parent=root,
        ),
        pb_span(tid, "redis get", {"db.system": "redis", "db.operation": "GET"}, parent=root),
        pb_span(
            tid,
            "tool",
            {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search"},
            parent=root,
            code=2,
            events=[("exception", {"exception.type": "ValueError", "exception.message": "bad"})],
        ),
        pb_span(tid, "custom", {"keel.span.kind": "Guardrail", "x": 1.5}, parent=root, code=1),
        pb_span(tid, "plain http", {"http.method": "GET"}, parent=root),
    ]
    r = okeel.post(pb_request(spans), PB)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-protobuf"
    ExportTraceServiceResponse().ParseFromString(r.content)

    rows = by_name(okeel.spans())
    assert len(rows) == len(spans)
    a = rows["answer"]
    assert (a["kind"], a["service"], a["parent_span_id"]) == ("chain", "shop", None)
    assert (a["trace_id"], a["span_id"]) == (tid.hex(), root.hex())
    assert (a["input"], a["output"], a["status"]) == (
        "what is the refund policy?",
        "30 days",
        "unset",
    )
    assert a["duration_ms"] == pytest.approx(100)
    attrs = orjson.loads(a["attributes"])
    assert attrs["app.user"] == "u1"  # unknown attributes are kept…
    assert attrs["app.tags"] == ["a", "b"]
    assert attrs["app.meta"] == {"k": 1, "ok": True}
    assert attrs["app.blob"] == "AAE="  # bytes as base64
    assert attrs["input.value"] == "what is the refund policy?"  # …and known ones too

    c = rows["chat gpt-4o"]
    assert (c["kind"], c["model"], c["prompt_tokens"], c["completion_tokens"]) == (
        "llm",
        "gpt-4o",
        11,
        7,
    )
    assert c["parent_span_id"] == root.hex()
    assert orjson.loads(c["input"]) == [{"role": "user", "content": "hi"}]
    assert orjson.loads(c["output"]) == [{"role": "assistant", "content": "hello"}]
    assert orjson.loads(c["attributes"])["server.address"] == "api.openai.com"

    rt = rows["retrieve"]
    assert (rt["kind"], rt["result_count"], rt["top_score"]) == ("retrieval", 3, 0.8)
    e = rows["embed"]
    assert (e["kind"], e["model"]) == ("embedding", "all-MiniLM-L6-v2")
    o = rows["llm oi"]
    assert (o["kind"], o["model"], o["prompt_tokens"], o["completion_tokens"]) == (
        "llm",
        "claude-x",
        20,
        5,
    )
    assert orjson.loads(o["input"]) == [{"role": "user", "content": "question"}]
    assert orjson.loads(o["output"]) == [{"content": "answer"}]
    assert (rows["qdrant search"]["kind"], rows["qdrant search"]["result_count"]) == (
        "vector-db",
        0,
    )
    assert (rows["redis knn"]["kind"], rows["redis knn"]["result_count"]) == ("vector-db", 4)
    assert rows["redis get"]["kind"] == "other"
    t = rows["tool"]
    assert (t["kind"], t["status"], t["status_message"]) == ("tool", "error", "ValueError: bad")
    assert orjson.loads(t["events"])[0]["name"] == "exception"
    assert (rows["custom"]["kind"], rows["custom"]["status"]) == ("guardrail", "ok")
    assert rows["plain http"]["kind"] == "other"


def test_json_ingest_hex_ids_enum_names_and_anyvalues(okeel: OtlpKeel) -> None:
    tid, sid, parent = os.urandom(16).hex(), os.urandom(8).hex(), os.urandom(8).hex()
    now = time.time_ns()
    doc = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "js-app"}}]
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "manual"},
                        "spans": [
                            {
                                "traceId": tid.upper(),  # case does not matter
                                "spanId": sid,
                                "parentSpanId": parent,
                                "name": "embeddings text-embedding-3-small",
                                "kind": "SPAN_KIND_CLIENT",
                                "startTimeUnixNano": str(now),
                                "endTimeUnixNano": str(now + 5_000_000),
                                "attributes": [
                                    {
                                        "key": "gen_ai.operation.name",
                                        "value": {"stringValue": "embeddings"},
                                    },
                                    {
                                        "key": "gen_ai.request.model",
                                        "value": {"stringValue": "text-embedding-3-small"},
                                    },
                                    {
                                        "key": "gen_ai.usage.input_tokens",
                                        "value": {"intValue": "42"},
                                    },
                                    {"key": "x.ratio", "value": {"doubleValue": 0.25}},
                                    {"key": "x.flag", "value": {"boolValue": True}},
                                    {
                                        "key": "x.list",
                                        "value": {
                                            "arrayValue": {
                                                "values": [{"intValue": 1}, {"stringValue": "b"}]
                                            }
                                        },
                                    },
                                    {
                                        "key": "x.map",
                                        "value": {
                                            "kvlistValue": {
                                                "values": [
                                                    {"key": "k", "value": {"stringValue": "v"}}
                                                ]
                                            }
                                        },
                                    },
                                    {"key": "x.empty", "value": {}},
                                ],
                                "events": [
                                    {
                                        "name": "gen_ai.content.prompt",
                                        "timeUnixNano": str(now),
                                        "attributes": [
                                            {
                                                "key": "gen_ai.prompt",
                                                "value": {"stringValue": "embed this"},
                                            }
                                        ],
                                    }
                                ],
                                "status": {"code": "STATUS_CODE_ERROR", "message": "rate limited"},
                            }
                        ],
                    }
                ],
            }
        ]
    }
    r = okeel.post(orjson.dumps(doc), JS)
    assert r.status_code == 200, r.text
    assert r.json() == {}
    [row] = okeel.spans()
    assert (row["trace_id"], row["span_id"], row["parent_span_id"]) == (tid, sid, parent)
    assert (row["kind"], row["model"], row["prompt_tokens"]) == (
        "embedding",
        "text-embedding-3-small",
        42,
    )
    assert (row["status"], row["status_message"], row["service"]) == (
        "error",
        "rate limited",
        "js-app",
    )
    assert row["duration_ms"] == pytest.approx(5)
    assert row["input"] == "embed this"  # from the gen_ai.content.prompt event
    attrs = orjson.loads(row["attributes"])
    assert attrs["x.ratio"] == 0.25 and attrs["x.flag"] is True
    assert attrs["x.list"] == [1, "b"] and attrs["x.map"] == {"k": "v"}
    assert attrs["x.empty"] is None


def test_gzip_and_deflate_bodies(okeel: OtlpKeel) -> None:
    body = pb_request([pb_span(os.urandom(16), "gz", {"keel.span.kind": "tool"})])
    r = okeel.post(gzip.compress(body), {**PB, "content-encoding": "gzip"})
    assert r.status_code == 200, r.text
    body2 = pb_request([pb_span(os.urandom(16), "zz", {})])
    r = okeel.post(zlib.compress(body2), {**PB, "content-encoding": "deflate"})
    assert r.status_code == 200, r.text
    assert {s["name"] for s in okeel.spans()} == {"gz", "zz"}


def test_duplicates_ignored_on_retry_and_within_a_request(okeel: OtlpKeel) -> None:
    tid, sid = os.urandom(16), os.urandom(8)
    span = pb_span(tid, "once", {"a": 1}, sid=sid)
    body = pb_request([span, span])
    for _ in range(3):
        assert okeel.post(body, PB).status_code == 200
    assert count(okeel) == 1


@pytest.mark.parametrize(
    ("body", "headers", "needle"),
    [
        (b"\xff\xfe not protobuf", PB, "protobuf"),
        (b"{not json", JS, "JSON"),
        (b"[]", JS, "resourceSpans"),
        (b"hello", {"content-type": "text/plain"}, "Content-Type"),
        (b"", {}, "Content-Type"),
        (b"\x1f\x8b broken gzip", {**PB, "content-encoding": "gzip"}, "gzip"),
        (b"x", {**PB, "content-encoding": "br"}, "Content-Encoding"),
    ],
)
def test_bad_bodies_are_400(okeel: OtlpKeel, body: bytes, headers: dict, needle: str) -> None:
    r = okeel.post(body, headers)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert needle in err["message"]
    assert count(okeel) == 0


def _json_doc(spans: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]})


def test_invalid_ids_reject_the_whole_request(okeel: OtlpKeel) -> None:
    good_pb = pb_span(os.urandom(16), "good", {})
    for bad in (
        pb_span(b"", "no trace id", {}),
        pb_span(bytes(16), "zero trace id", {}),
        pb_span(os.urandom(8), "short trace id", {}),
        pb_span(os.urandom(16), "bad parent", {}, parent=os.urandom(3)),
    ):
        r = okeel.post(pb_request([good_pb, bad]), PB)
        assert r.status_code == 400, bad.name
        assert "spans[1]" in r.json()["error"]["message"]
    no_span_id = pb_span(os.urandom(16), "x", {})
    no_span_id.span_id = b""
    assert okeel.post(pb_request([no_span_id]), PB).status_code == 400

    good = {"traceId": os.urandom(16).hex(), "spanId": os.urandom(8).hex(), "name": "ok"}
    for bad_js in (
        {"traceId": "", "spanId": os.urandom(8).hex(), "name": "empty"},
        {"traceId": "xyz", "spanId": os.urandom(8).hex(), "name": "not hex"},
        {"traceId": os.urandom(16).hex(), "name": "no span id"},
        {**good, "spanId": os.urandom(8).hex(), "attributes": [{"value": {}}]},
        {**good, "spanId": os.urandom(8).hex(), "startTimeUnixNano": "soon"},
        {**good, "spanId": os.urandom(8).hex(), "status": {"code": "MAYBE"}},
    ):
        r = okeel.post(_json_doc([good, bad_js]), JS)
        assert r.status_code == 400, bad_js
        assert "spans[1]" in r.json()["error"]["message"]
    assert count(okeel) == 0  # the valid span of each request was not written either


def test_base64_ids_in_json_are_accepted(okeel: OtlpKeel) -> None:
    tid, sid = os.urandom(16), os.urandom(8)
    doc = _json_doc(
        [
            {
                "traceId": base64.b64encode(tid).decode(),
                "spanId": base64.b64encode(sid).decode(),
                "name": "b64",
            }
        ]
    )
    assert okeel.post(doc, JS).status_code == 200
    [row] = okeel.spans()
    assert (row["trace_id"], row["span_id"]) == (tid.hex(), sid.hex())


def test_oversized_bodies_are_413(otlp_factory: Any) -> None:
    k = otlp_factory(gateway={"max_body_bytes": 2048})
    big = pb_request([pb_span(os.urandom(16), "big", {"input.value": "x" * 4000})])
    r = k.post(big, PB)
    assert r.status_code == 413, r.text
    # streamed without a Content-Length
    r = httpx.post(k.url + "/v1/traces", content=iter([big[:1000], big[1000:]]), headers=PB)
    assert r.status_code == 413
    # a small gzip body that inflates past the limit
    bomb = gzip.compress(pb_request([pb_span(os.urandom(16), "z", {"input.value": "0" * 9000})]))
    assert len(bomb) < 2048
    r = k.post(bomb, {**PB, "content-encoding": "gzip"})
    assert r.status_code == 413
    assert count(k) == 0


# -- store down -----------------------------------------------------------------


def _readable_spans(n: int) -> list[Any]:
    from opentelemetry.sdk.resources import Resource as SdkResource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext, TraceFlags

    res = SdkResource.create({"service.name": "exporter-test"})
    tid = int.from_bytes(os.urandom(16), "big")
    now = time.time_ns()
    return [
        ReadableSpan(
            name=f"s{i}",
            context=SpanContext(tid, int.from_bytes(os.urandom(8), "big"), False, TraceFlags(1)),
            resource=res,
            attributes={"keel.span.kind": "retrieval", "keel.result_count": i},
            start_time=now,
            end_time=now + 1_000_000,
        )
        for i in range(n)
    ]


@pytest.mark.postgres
def test_store_down_503_then_exporter_retry_lands_exactly_once(
    otlp_factory: Any, pg_url: str
) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    k = otlp_factory(database_url=pg_url)
    spans = _readable_spans(50)
    set_pg_connections(pg_url, False)
    try:
        r = k.post(pb_request([pb_span(os.urandom(16), "down", {})]), PB)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "store_unavailable"
        result: list[Any] = []
        exporter = OTLPSpanExporter(endpoint=k.url + "/v1/traces", timeout=30)
        t = threading.Thread(target=lambda: result.append(exporter.export(spans)))
        t.start()
        time.sleep(1.5)  # the exporter is retrying on 503
        assert t.is_alive()
    finally:
        set_pg_connections(pg_url, True)
    t.join(30)
    assert result == [SpanExportResult.SUCCESS]
    # a late duplicate retry changes nothing
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    rows = k.spans()
    assert sorted(r["name"] for r in rows) == sorted(f"s{i}" for i in range(50))
    assert "down" not in {r["name"] for r in rows}


# -- stats, metrics ---------------------------------------------------------------


def test_span_stats_and_retrieval_metrics(okeel: OtlpKeel) -> None:
    tid = os.urandom(16)
    durations = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    results = [3, 0, 5, 0, 2, 1, 4, 4, 0, 1]
    scores = [0.9, None, 0.7, None, 0.5, 0.3, 0.8, 0.6, None, 0.4]
    spans = []
    for i, (d, n, s) in enumerate(zip(durations, results, scores, strict=True)):
        attrs: dict[str, Any] = {"keel.span.kind": "retrieval", "keel.result_count": n}
        if s is not None:
            attrs["keel.top_score"] = s
        spans.append(pb_span(tid, f"r{i}", attrs, dur_ms=d))
    spans.append(pb_span(tid, "vec", {"db.system": "pgvector", "keel.result_count": 2}, dur_ms=5))
    old = pb_span(tid, "old", {"keel.span.kind": "retrieval", "keel.result_count": 0})
    old.start_time_unix_nano -= 3 * 3600 * 10**9  # outside a 1h window
    old.end_time_unix_nano -= 3 * 3600 * 10**9
    spans.append(old)
    assert okeel.post(pb_request(spans, service="rag"), PB).status_code == 200

    st = httpx.get(okeel.url + "/api/spans/stats", params={"kind": "retrieval"}).json()
    assert st["count"] == 10
    assert st["latency_p50_ms"] == pytest.approx(50)
    assert st["latency_p95_ms"] == pytest.approx(100)
    assert st["latency_mean_ms"] == pytest.approx(55)
    assert st["mean_result_count"] == pytest.approx(2.0)
    assert st["empty_result_rate"] == pytest.approx(0.3)
    assert st["mean_top_score"] == pytest.approx(0.6)
    assert st["min_top_score"] == pytest.approx(0.3)
    assert st["max_top_score"] == pytest.approx(0.9)
    wide = httpx.get(okeel.url + "/api/spans/stats?kind=retrieval&window=1d").json()
    assert wide["count"] == 11 and wide["empty_result_rate"] == pytest.approx(4 / 11)
    vec = httpx.get(okeel.url + "/api/spans/stats?kind=vector-db&window=1h&service=rag").json()
    assert (vec["count"], vec["mean_result_count"]) == (1, 2.0)
    none = httpx.get(okeel.url + "/api/spans/stats?kind=tool").json()
    assert none["count"] == 0 and none["latency_p50_ms"] is None
    bad = httpx.get(okeel.url + "/api/spans/stats?window=yesterday")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "window"

    reg = okeel.state.registry
    val = reg.get_sample_value
    assert val("keel_spans_ingested_total", {"kind": "retrieval"}) == 11
    assert val("keel_spans_ingested_total", {"kind": "vector-db"}) == 1
    assert val("keel_retrieval_empty_total", {"kind": "retrieval"}) == 4
    assert val("keel_retrieval_results_count", {"kind": "retrieval"}) == 11
    assert val("keel_retrieval_results_sum", {"kind": "retrieval"}) == 20
    assert val("keel_retrieval_top_score_count", {"kind": "retrieval"}) == 7
    assert (
        val("keel_retrieval_duration_seconds_count", {"kind": "vector-db", "service": "rag"}) == 1
    )
    text = httpx.get(okeel.url + "/metrics").text
    assert 'keel_spans_ingested_total{kind="retrieval"} 11.0' in text


def test_openapi_documents_the_body(okeel: OtlpKeel) -> None:
    spec = httpx.get(okeel.url + "/openapi.json").json()
    body = spec["paths"]["/v1/traces"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/x-protobuf", "application/json"}
    assert "/api/spans/stats" in spec["paths"]


# -- trees -------------------------------------------------------------------------


def test_gateway_call_joins_the_app_trace_and_tree_nests_it(okeel: OtlpKeel) -> None:
    tid, root, child = os.urandom(16), os.urandom(8), os.urandom(8)
    r = httpx.post(
        okeel.url + "/v1/chat/completions",
        json={"model": "gpt", "messages": [{"role": "user", "content": "hi"}]},
        headers={"traceparent": f"00-{tid.hex()}-{child.hex()}-01"},
    )
    assert r.status_code == 200
    keel_id = r.headers["x-keel-trace-id"]
    spans = [
        pb_span(tid, "handle request", {"keel.span.kind": "chain"}, sid=root, dur_ms=5000),
        pb_span(tid, "call llm", {"keel.span.kind": "llm"}, sid=child, parent=root, dur_ms=4000),
        pb_span(tid, "retrieve", {"keel.span.kind": "retrieval"}, parent=root, start_ms=-1),
        pb_span(tid, "orphan", {}, parent=os.urandom(8), start_ms=1),
    ]
    # start the app spans around "now" so the gateway call falls inside
    for s in spans:
        s.start_time_unix_nano += 60 * 10**9 - 1_000_000_000
        s.end_time_unix_nano += 60 * 10**9 - 1_000_000_000
    assert okeel.post(pb_request(spans), PB).status_code == 200
    okeel.flush()

    tree = httpx.get(okeel.url + f"/api/otel-traces/{tid.hex()}").json()
    assert tree["otel_trace_id"] == tid.hex()
    assert tree["keel_trace_ids"] == [keel_id]
    assert tree["span_count"] == 5
    roots = tree["spans"]
    assert [n["name"] for n in roots] == ["handle request", "orphan"]
    top = roots[0]
    assert top["depth"] == 0
    assert [c["name"] for c in top["children"]] == ["retrieve", "call llm"]
    llm = top["children"][1]
    [gw] = llm["children"]
    assert gw["source"] == "gateway" and gw["name"] == "keel.gateway chat"
    assert (gw["kind"], gw["model"], gw["keel_trace_id"], gw["depth"]) == (
        "llm",
        "gpt",
        keel_id,
        2,
    )
    assert gw["parent_span_id"] == child.hex() and gw["prompt_tokens"]
    assert [(w["name"], w["depth"]) for w in tree["waterfall"]] == [
        ("handle request", 0),
        ("retrieve", 1),
        ("call llm", 1),
        ("keel.gateway chat", 2),
        ("orphan", 0),
    ]
    assert tree["waterfall"][1]["offset_ms"] == 0  # "retrieve" starts first
    # the Keel trace id finds the same tree
    by_keel = trace_tree(okeel.state.engine, keel_id)
    assert by_keel["otel_trace_id"] == tid.hex() and by_keel["span_count"] == 5
    # unknown ids are 404
    r = httpx.get(okeel.url + f"/api/otel-traces/{os.urandom(16).hex()}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "trace_not_found"
    assert httpx.get(okeel.url + "/api/otel-traces/nope").status_code == 404


def test_tree_of_a_gateway_call_without_traceparent(okeel: OtlpKeel) -> None:
    r = httpx.post(
        okeel.url + "/v1/embeddings", json={"model": "emb", "input": "hello"}, timeout=10
    )
    assert r.status_code == 200
    okeel.flush()
    tree = trace_tree(okeel.state.engine, r.headers["x-keel-trace-id"])
    assert tree["otel_trace_id"] is None
    [node] = tree["spans"]
    assert (node["kind"], node["name"], node["children"]) == (
        "embedding",
        "keel.gateway embeddings",
        [],
    )


def test_build_tree_survives_cycles_and_duplicates() -> None:
    def node(sid: str, parent: str | None, start: int) -> dict[str, Any]:
        return {
            "span_id": sid,
            "parent_span_id": parent,
            "name": sid,
            "kind": "other",
            "source": "app",
            "status": "unset",
            "start_us": start,
            "end_us": start + 10,
            "duration_ms": 0.01,
        }

    nodes = [node("a", "b", 1), node("b", "a", 2), node("c", None, 0), node("d", "d", 3)]
    tree = build_tree(nodes, "t", [])
    assert tree["span_count"] == 4
    names = sorted(w["name"] for w in tree["waterfall"])
    assert names == ["a", "b", "c", "d"]  # every span shown exactly once


# -- mapping units -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attrs", "kind"),
    [
        ({"keel.span.kind": "Retrieval"}, "retrieval"),
        ({"keel.span.kind": "vector_db"}, "vector-db"),
        ({"openinference.span.kind": "RERANKER"}, "reranker"),
        ({"openinference.span.kind": "AGENT"}, "agent"),
        ({"gen_ai.operation.name": "text_completion"}, "llm"),
        ({"gen_ai.operation.name": "embeddings"}, "embedding"),
        ({"gen_ai.operation.name": "invoke_agent"}, "agent"),
        ({"gen_ai.system": "openai", "gen_ai.request.model": "m"}, "llm"),
        ({"db.system": "chroma"}, "vector-db"),
        ({"db.system.name": "milvus"}, "vector-db"),
        ({"db.system": "postgresql", "db.statement": "SELECT … ORDER BY v <=> $1"}, "vector-db"),
        ({"db.system": "postgresql", "db.statement": "SELECT 1"}, "other"),
        ({}, "other"),
    ],
)
def test_span_kind(attrs: dict[str, Any], kind: str) -> None:
    assert span_kind(attrs) == kind


def test_map_span_clips_and_sanitises() -> None:
    row = map_span(
        "a" * 32,
        "b" * 16,
        None,
        "n" * 500,
        2_000_000,
        1_000_000,  # ends before it starts
        0,
        "",
        {
            "input.value": "x\x00y" + "z" * 40_000,
            "gen_ai.usage.input_tokens": 2**40,  # not an int32: dropped, not a failed batch
            "keel.top_score": float("nan"),
        },
        None,
        "s" * 300,
    )
    assert len(row["name"]) == 300 and len(row["service"]) == 200
    assert row["duration_ms"] == 0 and row["end_us"] == row["start_us"]
    assert "\x00" not in row["input"] and row["input"].endswith("[truncated]")
    assert row["prompt_tokens"] is None and row["top_score"] is None
