"""Recorder throughput: sustained traces/s into SQLite and PostgreSQL, and enqueue cost.

Each trace carries realistic bodies (≈2 KB in total). The request path's cost
is `Recorder.record()` (enqueue); the writer thread then drains the queue in
batches into the store, maintaining the per-minute rollups in the same
transactions.

    python bench/recorder.py [--traces 50000] [--pg postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import orjson
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).parent))
from _harness import pg_database, table
from keel._ids import new_id
from keel.store.engine import make_engine, migrate
from keel.store.recorder import Recorder

WORDS = "the quick brown fox jumps over lazy dog model latency token cost drift".split()


def body(n_chars: int, rnd: random.Random) -> str:
    words = []
    size = 0
    while size < n_chars:
        w = rnd.choice(WORDS)
        words.append(w)
        size += len(w) + 1
    return " ".join(words)


def make_traces(n: int) -> list[dict]:
    rnd = random.Random(7)
    now = int(time.time() * 1000)
    out = []
    for i in range(n):
        req = orjson.dumps(
            {
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "You are a support assistant."},
                    {"role": "user", "content": body(1100, rnd)},
                ],
            }
        ).decode()
        resp = orjson.dumps(
            {"choices": [{"message": {"role": "assistant", "content": body(700, rnd)}}]}
        ).decode()
        out.append(
            {
                "id": new_id(),
                "started_at_ms": now + i // 50,
                "duration_ms": rnd.lognormvariate(6, 1),
                "ttft_ms": None,
                "endpoint": "chat",
                "model": rnd.choice(["gpt", "claude", "local"]),
                "provider": "p",
                "upstream_model": "u",
                "status": "ok" if i % 50 else "error",
                "http_status": 200,
                "stream": False,
                "prompt_tokens": 300,
                "completion_tokens": 180,
                "total_tokens": 480,
                "tokens_estimated": False,
                "user_id": f"user{i % 100}",
                "feature": "chat",
                "request_body": req,
                "response_body": resp,
            }
        )
    return out


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def run(name: str, url: str, traces: list[dict]) -> list[object]:
    engine = make_engine(url)
    migrate(engine)
    with tempfile.TemporaryDirectory() as d:
        rec = Recorder(
            engine,
            Path(d) / "spill",
            queue_size=len(traces) + 1,
            batch_size=1000,
            flush_interval_s=0.05,
        )
        t0 = time.perf_counter()
        for t in traces:
            rec.record(t)
        enqueue_us = (time.perf_counter() - t0) / len(traces) * 1e6
        c0, t0 = cpu(), time.perf_counter()
        rec.start()
        assert rec.flush(600), "writer did not finish"
        wall = time.perf_counter() - t0
        used = cpu() - c0
        rec.stop()
    with engine.connect() as c:
        stored = c.execute(sa.text("SELECT COUNT(*) FROM traces")).scalar()
        rolled = c.execute(sa.text("SELECT SUM(requests) FROM rollups_minute")).scalar()
    engine.dispose()
    assert stored == rolled == len(traces), (stored, rolled)
    size = sum(len(t["request_body"]) + len(t["response_body"]) for t in traces) / len(traces)
    return [
        name,
        len(traces),
        f"{size:.0f}",
        f"{enqueue_us:.2f}",
        f"{len(traces) / wall:,.0f}",
        f"{used / wall:.2f}",
        f"{used / len(traces) * 1e6:.0f}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", type=int, default=50_000)
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    a = ap.parse_args()
    traces = make_traces(a.traces)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        rows.append(run("SQLite (WAL)", f"sqlite:///{d}/bench.db", traces))
    with pg_database(a.pg) as url:
        rows.append(run("PostgreSQL", url, make_traces(a.traces)))
    print(f"recorder: {a.traces} traces per store, batches of 1000, rollups maintained")
    print(
        table(
            [
                "store",
                "traces",
                "body bytes",
                "enqueue µs",
                "traces/s",
                "cores used",
                "CPU µs/trace",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
