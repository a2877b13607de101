"""Host-side cost of the SDK: µs added to a trivial function by ``@keel.observe``.

Each row times N calls of ``f(x) = x + 1`` in a loop, minus the same loop
undecorated:
- "inline": the loop alone; the exporter's thread runs concurrently and takes
  its share of the GIL, so its cost shows here too, partly;
- "host CPU": CPU time of this process (loop, span processor, encoding and HTTP
  sends of every span) per call: the whole cost to the application;
- "incl. export": wall time until every span has been sent and acknowledged,
  per call; with the Keel server on the same machine this is bounded by the
  server's ingest rate, not by the SDK.
"real exporter" posts to a Keel server in another process (the spans stored
are counted); "no-op exporter" isolates the SDK's own work; ``fast=False`` is
stock OpenTelemetry (SDK spans and the official encoder).

    python bench/sdk_overhead.py [--calls 100000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).parent))
import keel
from _harness import table
from keel import sdk
from otlp_ingest import server


def plain(x: int) -> int:
    return x + 1


def timed(fn: Callable[[int], int], n: int) -> tuple[float, float, float]:
    """(loop s, loop + flush s, process CPU s) for n calls."""
    for i in range(1000):  # warm-up
        fn(i)
    keel.flush()
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(n):
        fn(i)
    t1 = time.perf_counter()
    keel.flush(60)
    return t1 - t0, time.perf_counter() - t0, time.process_time() - c0


def variants() -> list[tuple[str, Callable[[int], int]]]:
    @keel.observe
    def observed(x: int) -> int:
        return x + 1

    @keel.observe(capture_input=False, capture_output=False)
    def bare(x: int) -> int:
        return x + 1

    def with_span(x: int) -> int:
        with keel.span("f", kind="tool"):
            return x + 1

    return [
        ("@observe (input+output)", observed),
        ("@observe (no capture)", bare),
        ("with keel.span()", with_span),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=100_000)
    n = ap.parse_args().calls
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class NoOp(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    base, _, base_cpu = timed(plain, n)
    rows: list[list[object]] = [
        ["plain function", "-", f"{base / n * 1e6:.2f} µs/call", "", "", ""]
    ]

    sdk.shutdown()
    for label, fn in variants()[:1]:
        loop, _, cpu = timed(fn, n)
        rows.append(["no init (no provider)", label, f"+{(loop - base) / n * 1e6:.2f}", "", "", ""])

    keel.init(exporter=NoOp(), service_name="bench", queue_size=n + 10_000)
    for label, fn in variants():
        loop, total, cpu = timed(fn, n)
        rows.append(
            [
                "no-op exporter",
                label,
                f"+{(loop - base) / n * 1e6:.2f}",
                f"+{(total - base) / n * 1e6:.2f}",
                f"{(cpu - base_cpu) / n * 1e6:.2f}",
                "",
            ]
        )
    keel.shutdown()

    with server(None) as (port, _pid, url):
        keel.init(endpoint=f"http://127.0.0.1:{port}", service_name="bench", queue_size=n + 10_000)
        eng = sa.create_engine(url)
        for label, fn in variants():
            with eng.connect() as c:
                before = c.execute(sa.text("SELECT count(*) FROM spans")).scalar() or 0
            loop, total, cpu = timed(fn, n)
            with eng.connect() as c:
                after = c.execute(sa.text("SELECT count(*) FROM spans")).scalar() or 0
            rows.append(
                [
                    "real exporter → Keel",
                    label,
                    f"+{(loop - base) / n * 1e6:.2f}",
                    f"+{(total - base) / n * 1e6:.2f}",
                    f"{(cpu - base_cpu) / n * 1e6:.2f}",
                    f"{after - before - 1000:,}/{n:,}",
                ]
            )
        keel.shutdown()
        # The same with stock OpenTelemetry (SDK spans, official encoder).
        keel.init(
            endpoint=f"http://127.0.0.1:{port}",
            service_name="bench",
            queue_size=n + 10_000,
            fast=False,
        )
        label, fn = variants()[0]
        with eng.connect() as c:
            before = c.execute(sa.text("SELECT count(*) FROM spans")).scalar() or 0
        loop, total, cpu = timed(fn, n)
        with eng.connect() as c:
            after = c.execute(sa.text("SELECT count(*) FROM spans")).scalar() or 0
        rows.append(
            [
                "real exporter, fast=False",
                label,
                f"+{(loop - base) / n * 1e6:.2f}",
                f"+{(total - base) / n * 1e6:.2f}",
                f"{(cpu - base_cpu) / n * 1e6:.2f}",
                f"{after - before - 1000:,}/{n:,}",
            ]
        )
        keel.shutdown()
        eng.dispose()
    print(f"\nSDK overhead per call, {n:,} calls, BatchSpanProcessor ({os.cpu_count()} CPUs)\n")
    print(
        table(
            [
                "exporter",
                "instrumentation",
                "inline µs/call",
                "incl. export µs/call",
                "host CPU µs/call",
                "spans stored",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
