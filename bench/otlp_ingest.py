"""OTLP ingest throughput: spans/s into SQLite and PostgreSQL, and server CPU per span.

The client is the official ``OTLPSpanExporter`` (protobuf over HTTP) exporting
pre-built ``ReadableSpan`` batches of 512 from a few threads, as the SDK's
``BatchSpanProcessor`` would. The server is Keel (``create_app`` plus the OTLP
router) in its own process; its CPU time comes from ``/proc/<pid>/stat``, so
"spans/s on one core" is 1e6 / (server CPU µs per span).

    python bench/otlp_ingest.py [--spans 100000] [--threads 4] [--pg postgresql+psycopg://…/test]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).parent))
from _harness import cpu_seconds, free_port, pg_database, table, wait_port

BATCH = 512
# With two or more CPUs the server runs on CPU 0 alone and this client on the
# others, so "spans/s" is what one server core ingests (PostgreSQL's own
# backend process is not pinned).
SERVER_CPU = 0
PIN = hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2


def _pin(cpu: int) -> Any:
    if not PIN:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def serve(port: int, data_dir: str, db: str | None) -> None:
    import uvicorn

    from keel.app import create_app
    from keel.config import Settings

    logging.basicConfig(level=logging.WARNING)
    sys.setswitchinterval(0.0005)  # as `keel up`
    s = Settings.model_validate(
        {"data_dir": data_dir, "database_url": db, "local": {"enabled": False}}
    )
    app = create_app(s)  # includes the OTLP router
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )


@contextlib.contextmanager
def server(db: str | None) -> Iterator[tuple[int, int, str]]:
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        p = subprocess.Popen(
            [sys.executable, __file__, "serve", "--port", str(port), "--data-dir", d]
            + (["--db", db] if db else []),
            preexec_fn=_pin(SERVER_CPU),
        )
        try:
            wait_port(port)
            yield port, p.pid, db or f"sqlite:///{d}/keel.db"
        finally:
            p.terminate()
            p.wait(30)


def make_spans(n: int) -> list[list]:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

    rnd = random.Random(11)
    res = Resource.create({"service.name": "bench-app"})
    scope = InstrumentationScope("bench", "1.0")
    now = time.time_ns()
    spans = []
    trace_id = rnd.getrandbits(128)
    parent = None
    for i in range(n):
        if i % 8 == 0:  # traces of 8 spans: a chain with 7 children
            trace_id, parent = rnd.getrandbits(128), None
        ctx = SpanContext(trace_id, rnd.getrandbits(64), False, TraceFlags(1))
        kind = ("chain", "llm", "retrieval", "tool")[0 if parent is None else 1 + i % 3]
        attrs: dict = {"keel.span.kind": kind, "app.request_id": f"req-{i // 8}"}
        if kind == "llm":
            attrs |= {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": "gpt-4o-mini",
                "gen_ai.usage.input_tokens": 120 + i % 50,
                "gen_ai.usage.output_tokens": 40 + i % 30,
            }
        elif kind == "retrieval":
            attrs |= {"keel.result_count": i % 5, "keel.top_score": rnd.random()}
        else:
            attrs |= {"input.value": "what is the refund policy?", "output.value": "30 days"}
        start = now + i * 1000
        spans.append(
            ReadableSpan(
                name=f"{kind} step",
                context=ctx,
                parent=parent,
                resource=res,
                attributes=attrs,
                kind=SpanKind.INTERNAL,
                status=Status(StatusCode.OK),
                start_time=start,
                end_time=start + 2_000_000,
                instrumentation_scope=scope,
            )
        )
        if parent is None:
            parent = ctx
    return [spans[i : i + BATCH] for i in range(0, n, BATCH)]


def run(db: str | None, batches: list[list], threads: int) -> dict:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    n = sum(len(b) for b in batches)
    with server(db) as (port, pid, url):
        ep = f"http://127.0.0.1:{port}/v1/traces"
        OTLPSpanExporter(endpoint=ep).export(batches[0][:8])  # warm-up (already migrated)
        todo = list(batches)
        lock = threading.Lock()
        failures = []

        def worker() -> None:
            exp = OTLPSpanExporter(endpoint=ep, timeout=30)
            while True:
                with lock:
                    if not todo:
                        return
                    b = todo.pop()
                if exp.export(b) is not SpanExportResult.SUCCESS:
                    failures.append(len(b))

        cpu0 = cpu_seconds(pid)
        t0 = time.perf_counter()
        ts = [threading.Thread(target=worker) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(pid) - cpu0
        eng = sa.create_engine(url)
        with eng.connect() as c:
            stored = c.execute(sa.text("SELECT count(*) FROM spans")).scalar()
        eng.dispose()
    return {"n": n, "wall": wall, "cpu": cpu, "stored": stored, "failed": sum(failures)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        ap = argparse.ArgumentParser()
        ap.add_argument("serve")
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--data-dir", required=True)
        ap.add_argument("--db", default=None)
        a = ap.parse_args()
        serve(a.port, a.data_dir, a.db)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spans", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument(
        "--pg",
        default=os.environ.get("KEEL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    )
    a = ap.parse_args()
    if PIN:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 2)) - {SERVER_CPU})
    batches = make_spans(a.spans)
    rows = []
    stores: list[tuple[str, contextlib.AbstractContextManager]] = [
        ("SQLite", contextlib.nullcontext(None)),
        ("PostgreSQL", pg_database(a.pg)),
    ]
    for label, ctx in stores:
        try:
            with ctx as db:
                r = run(db, batches, a.threads)
        except Exception as e:  # PostgreSQL not running: say so, keep the SQLite row
            rows.append([label, "-", "-", "-", "-", f"skipped: {type(e).__name__}: {e}"[:80]])
            continue
        us = r["cpu"] / r["n"] * 1e6
        ok = "ok" if r["stored"] == r["n"] and not r["failed"] else f"stored {r['stored']}"
        rows.append(
            [
                label,
                f"{r['n']:,}",
                f"{r['n'] / r['wall']:,.0f}",
                f"{us:.1f}",
                f"{1e6 / us:,.0f}" if us else "-",
                ok,
            ]
        )
    print(
        f"\nOTLP ingest, official OTLPSpanExporter (protobuf/HTTP), batches of {BATCH}, "
        f"{a.threads} client threads, server in its own process"
        f"{' pinned to one CPU' if PIN else ''} ({os.cpu_count()} CPUs)\n"
    )
    print(
        table(
            ["store", "spans", "spans/s (wall)", "server CPU µs/span", "spans/s per core", "check"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
