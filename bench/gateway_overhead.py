"""What Keel adds to a call: latency, time to first token, CPU, throughput.

A zero-delay fake upstream runs in its own process on loopback, Keel in
another (recording ON, SQLite). The same requests go direct and through Keel,
interleaved one at a time, so machine noise hits both paths alike.

    python bench/gateway_overhead.py [--requests 3000] [--seconds 10] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import orjson

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from _harness import Conn, cpu_seconds, fake_upstream, keel_server, pct, table

BODY = orjson.dumps(
    {
        "model": "fake",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Summarise the following text in one sentence. " * 4},
        ],
    }
)
STREAM_BODY = orjson.dumps(
    {
        "model": "fake",
        "stream": True,
        "messages": [{"role": "user", "content": "one two three four five six seven eight"}],
    }
)


def config(upstream_port: int) -> str:
    return f"""
local: {{enabled: false}}
providers:
  fake: {{kind: openai, base_url: "http://127.0.0.1:{upstream_port}/v1"}}
models:
  fake: fake/fake
"""


async def sequential(up: int, kp: int, n: int) -> dict[str, list[float]]:
    direct, proxied = await Conn(up).open(), await Conn(kp).open()
    out: dict[str, list[float]] = {"direct": [], "keel": [], "ttft_direct": [], "ttft_keel": []}
    for _ in range(200):  # warm-up: connection pools, caches, JIT-less but lazy imports
        await direct.post("/v1/chat/completions", BODY)
        await proxied.post("/v1/chat/completions", BODY)
    for i in range(n):
        pairs = [(direct, "direct"), (proxied, "keel")]
        if i % 2:
            pairs.reverse()
        for conn, name in pairs:
            t0 = time.perf_counter()
            status, _ = await conn.post("/v1/chat/completions", BODY)
            out[name].append(time.perf_counter() - t0)
            assert status == 200, status
    for i in range(n // 4):
        pairs = [(direct, "ttft_direct"), (proxied, "ttft_keel")]
        if i % 2:
            pairs.reverse()
        for conn, name in pairs:
            out[name].append(await conn.post_first_chunk("/v1/chat/completions", STREAM_BODY))
    direct.close()
    proxied.close()
    return out


async def saturate(port: int, pid: int | None, seconds: float, conc: int) -> tuple[float, float]:
    conns = [await Conn(port).open() for _ in range(conc)]
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(c: Conn) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            status, _ = await c.post("/v1/chat/completions", BODY)
            assert status == 200
            done += 1

    cpu0 = cpu_seconds(pid) if pid else 0.0
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - t0
    cpu = (cpu_seconds(pid) - cpu0) if pid else 0.0
    for c in conns:
        c.close()
    return done / elapsed, (cpu / done * 1000 if done else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=32)
    a = ap.parse_args()
    with fake_upstream() as up, keel_server(config(up)) as (kp, kpid):
        seq = asyncio.run(sequential(up, kp, a.requests))
        rps_direct, _ = asyncio.run(saturate(up, None, a.seconds / 2, a.concurrency))
        rps_keel, cpu_ms = asyncio.run(saturate(kp, kpid, a.seconds, a.concurrency))

    ms = lambda v: f"{v * 1000:.3f}"  # noqa: E731
    added = lambda q, k="keel", d="direct": ms(pct(seq[k], q) - pct(seq[d], q))  # noqa: E731
    rows = [
        ["latency p50 (ms)", ms(pct(seq["direct"], 0.5)), ms(pct(seq["keel"], 0.5)), added(0.5)],
        ["latency p99 (ms)", ms(pct(seq["direct"], 0.99)), ms(pct(seq["keel"], 0.99)), added(0.99)],
        [
            "stream TTFT p50 (ms)",
            ms(pct(seq["ttft_direct"], 0.5)),
            ms(pct(seq["ttft_keel"], 0.5)),
            added(0.5, "ttft_keel", "ttft_direct"),
        ],
        [
            "stream TTFT p99 (ms)",
            ms(pct(seq["ttft_direct"], 0.99)),
            ms(pct(seq["ttft_keel"], 0.99)),
            added(0.99, "ttft_keel", "ttft_direct"),
        ],
        [f"throughput, {a.concurrency} conns (req/s)", f"{rps_direct:.0f}", f"{rps_keel:.0f}", ""],
        ["Keel CPU per proxied request (ms)", "", f"{cpu_ms:.3f}", ""],
    ]
    print(
        f"gateway overhead: {a.requests} sequential pairs, recording ON (SQLite), "
        f"body {len(BODY)} B"
    )
    print(table(["metric", "direct", "through Keel", "added"], rows))


if __name__ == "__main__":
    main()
