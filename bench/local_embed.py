"""Throughput of ``local-embed`` (the bundled all-MiniLM-L6-v2) on ONE core.

    .venv/bin/python bench/local_embed.py [--sentences 512] [--rounds 3]

Runs :class:`keel.gateway.providers._minilm.MiniLMEncoder` (the code behind the
gateway's ``local-embed``, without HTTP) on short sentences (5–15 words), in
calls of 1, 8, 32 and 64 sentences, pinned to one CPU with single-threaded
BLAS. Reports sentences per second of wall time and of CPU time (best of
``--rounds``) and the per-call latency.
Target: ≥ 200 sentences/s on one core (semantic evaluators and drift features
embed every scored output).
"""

from __future__ import annotations

import os

# BLAS reads these once, when numpy is first imported: set them before.
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import table  # noqa: E402
from keel.gateway.providers._minilm import MiniLMEncoder  # noqa: E402
from keel.gateway.providers.local import bundled_model_paths  # noqa: E402

WORDS = (
    "the a gateway model records every call latency token cost user answer question "
    "prompt cat dog house river city quickly slowly runs builds reads writes green small "
    "large old new report monitor alert drift score judge fast error budget team server "
    "data version dataset evaluation output input request response price week today"
).split()
BATCHES = (1, 8, 32, 64)
TARGET = 200.0


def sentences(n: int, seed: int = 7) -> list[str]:
    """``n`` short sentences of 5–15 words (deterministic)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(5, 15))
        out.append(" ".join(words).capitalize() + ".")
    return out


def run(
    enc: MiniLMEncoder, texts: list[str], batch: int, rounds: int
) -> tuple[float, float, float]:
    """(sentences/s of wall time, sentences per CPU second, ms per call), best of ``rounds``.

    Both clocks are reported: on a shared machine other processes take turns on
    the pinned core, so wall time understates what the core can do, while CPU
    time measures exactly the work of this process."""
    best_wall = best_cpu = float("inf")
    for _ in range(rounds):
        w0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(texts), batch):
            enc.encode(texts[i : i + batch])
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    calls = (len(texts) + batch - 1) // batch
    return len(texts) / best_wall, len(texts) / best_cpu, best_wall / calls * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    _, model_dir = bundled_model_paths()
    if model_dir is None:
        sys.exit("all-MiniLM-L6-v2 is not installed: `make install` (the local extra)")
    t0 = time.perf_counter()
    enc = MiniLMEncoder(model_dir)
    load_s = time.perf_counter() - t0
    texts = sentences(args.sentences)
    enc.encode(texts[:64])  # warm-up: first-touch of the weights, BLAS buffers
    rows = []
    for b in BATCHES:
        wall, cpu, ms = run(enc, texts, b, args.rounds)
        ok = "✓" if cpu >= TARGET else "✗"
        rows.append([b, f"{wall:,.0f}", f"{cpu:,.0f}", f"{ms:.2f}", ok])
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else "?"
    print(
        f"all-MiniLM-L6-v2, {len(texts)} sentences of 5–15 words, CPUs {sorted(cpus)}, "
        f"{platform.processor() or platform.machine()}, load {load_s:.2f} s"
    )
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    heads = ["batch", "sentences/s (wall)", "sentences/CPU-s", "ms/call (wall)"]
    print(table([*heads, f"≥ {TARGET:.0f}/CPU-s"], rows))


if __name__ == "__main__":
    main()
