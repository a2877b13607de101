"""How fast the embedded local models are on this machine.

    .venv/bin/python bench/local_model.py

Measures, through :class:`keel.gateway.providers.local.LocalProvider` (the code
the gateway runs, without HTTP): model load time, chat generation speed
(SmolLM2-135M Q4_1, 128 tokens, median of 3 streamed runs), time to the first
streamed chunk, and embedding latency (all-MiniLM-L6-v2) for 1 and 32 sentences.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from typing import Any

from keel.config import LocalSettings, ProviderSettings
from keel.gateway.providers.local import LocalProvider

PROMPTS = [
    "Write a very long story about a dragon, at least 2000 words.",
    "Write a very long story about a lighthouse keeper, at least 2000 words.",
    "Write a very long story about a lost robot, at least 2000 words.",
]
SENTENCES = [
    f"Sentence {i}: the gateway records every call, its latency, its tokens and its cost."
    for i in range(32)
]


async def _stream_once(p: LocalProvider, prompt: str, n_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first chunk, total seconds, completion tokens)."""
    body: dict[str, Any] = {
        "model": "local",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": n_tokens,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = None
    completion = 0
    async for _, chunk in p.chat_stream(body):
        if first is None:
            first = time.perf_counter() - t0
        if chunk.get("usage"):
            completion = chunk["usage"]["completion_tokens"]
    return first or 0.0, time.perf_counter() - t0, completion


async def _embed_ms(p: LocalProvider, texts: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await p.embeddings({"model": "local-embed", "input": texts})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


async def main(threads: int, n_tokens: int, runs: int) -> None:
    p = LocalProvider("local", ProviderSettings(kind="local"), local=LocalSettings(threads=threads))
    t0 = time.perf_counter()
    await p.start()
    total_load = time.perf_counter() - t0
    if not p.available:
        raise SystemExit(f"local models unavailable: {p.unavailable_reason}")
    try:
        # One warm-up of each path (first-call allocations are not what users wait on).
        await _stream_once(p, "Hello!", 8)
        await _embed_ms(p, SENTENCES[:1], 1)

        results = [await _stream_once(p, PROMPTS[i % len(PROMPTS)], n_tokens) for i in range(runs)]
        ttft = statistics.median(r[0] for r in results)
        e2e = statistics.median(r[2] / r[1] for r in results)
        decode = statistics.median((r[2] - 1) / (r[1] - r[0]) for r in results)
        tokens = [r[2] for r in results]
        emb1 = await _embed_ms(p, SENTENCES[:1], 20)
        emb32 = await _embed_ms(p, SENTENCES, 5)
    finally:
        await p.aclose()

    rows = [
        ("load: chat model (SmolLM2-135M Q4_1)", f"{p.load_times['local'] * 1000:.0f} ms"),
        (
            "load: embedding model (all-MiniLM-L6-v2)",
            f"{p.load_times['local-embed'] * 1000:.0f} ms",
        ),
        ("load: provider start (both, incl. imports)", f"{total_load * 1000:.0f} ms"),
        (f"chat: tokens/s end to end ({n_tokens} tok, median of {runs})", f"{e2e:.1f} tok/s"),
        ("chat: tokens/s after the first chunk", f"{decode:.1f} tok/s"),
        ("chat: time to first chunk (median)", f"{ttft * 1000:.0f} ms"),
        ("chat: completion tokens per run", ", ".join(map(str, tokens))),
        ("embeddings: 1 sentence (median of 20)", f"{emb1:.1f} ms"),
        ("embeddings: 32 sentences (median of 5)", f"{emb32:.1f} ms"),
    ]
    print(
        f"local models on {platform.machine()}, {os.cpu_count()} cores, "
        f"{threads} llama threads, Python {platform.python_version()}"
    )
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  value")
    print(f"{'-' * width}  {'-' * 14}")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    asyncio.run(main(args.threads, args.tokens, args.runs))
