"""Dataset validation throughput.

(a) every chat check, token counting included, over synthetic chat rows on one
    core: rows/s with the `local` model's llama.cpp tokenizer and with the
    chars/4 estimate (target ≥ 20,000 rows/s);
(b) near-duplicate detection alone over 1,000,000 rows with ~1 % planted near
    duplicates: seconds (target ≤ 120 s) and how many planted pairs were found.

    python bench/data_validation.py [--rows 200000] [--near-rows 1000000]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import table
from keel.data.checks import validate, word_hashes

WORDS = (
    "the a to of and in is it you that for on with as this be are can how what your "
    "model gateway budget cache policy deploy rollback prompt dataset version trace "
    "latency token cost alert monitor drift eval score registry canary replica queue "
    "write batch store rollup metric retention schema label split train valid test "
    "please explain configure example error fix install python server client request "
    "response stream chunk limit rate key user assistant system tool call result"
).split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n)).capitalize() + "."


def chat_rows(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        user = f"{_sentence(rng, rng.randint(8, 30))} Question {i}?"
        answer = " ".join(_sentence(rng, rng.randint(6, 16)) for _ in range(rng.randint(2, 5)))
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": answer},
                ],
                "metadata": {"source": "bench"},
                "split": "train" if i % 10 else "validation",
            }
        )
    return rows


def near_rows(n: int, seed: int = 2) -> tuple[list[dict], list[tuple[int, int]]]:
    """``n`` completion rows; 1 % are copies of an earlier row with one word
    changed (planted pairs)."""
    rng = random.Random(seed)
    rows: list[dict] = []
    planted = []
    for i in range(n):
        if i > 100 and rng.random() < 0.01:
            j = rng.randrange(i - 100)
            words = rows[j]["prompt"].split()
            words[rng.randrange(len(words))] = rng.choice(WORDS)
            rows.append({"prompt": " ".join(words), "completion": rows[j]["completion"]})
            planted.append((j, i))
        else:
            rows.append(
                {
                    "prompt": _sentence(rng, rng.randint(25, 45)),
                    "completion": _sentence(rng, rng.randint(10, 20)),
                }
            )
    return rows, planted


def _shingles(row: dict) -> set[tuple[int, ...]]:
    h = word_hashes(f"{row['prompt']}\n{row['completion']}")
    return {tuple(h[k : k + 3]) for k in range(len(h) - 2)}


def _jaccard(a: dict, b: dict) -> float:
    x, y = _shingles(a), _shingles(b)
    return len(x & y) / max(1, len(x | y))


def bench_full(n: int) -> list[list[object]]:
    rows = chat_rows(n)
    out = []
    for label, opts in (
        ("local (llama.cpp tokenizer)", {"model": "local"}),
        ("estimate (chars/4)", {"max_tokens": 8192}),
    ):
        t0 = time.perf_counter()
        report = validate(rows, "chat", options={"token_length": opts})
        dt = time.perf_counter() - t0
        tl = next(r for r in report.results if r.name == "token_length")
        out.append(
            [
                label,
                f"{n:,}",
                f"{dt:.1f}",
                f"{n / dt:,.0f}",
                f"{tl.details['total_tokens'] / n:.0f}",
                "✓" if n / dt >= 20_000 else "✗",
            ]
        )
    return out


def bench_near(n: int) -> list[list[object]]:
    rows, planted = near_rows(n)
    t0 = time.perf_counter()
    report = validate(
        rows,
        "completion",
        options={"only": ["near_duplicates"], "near_duplicates": {"all_clusters": True}},
    )
    dt = time.perf_counter() - t0
    r = report.results[0]
    # A planted pair is found when both rows ended in one cluster.
    member = {}
    for k, g in enumerate(r.details.get("all_clusters", [])):
        for x in g:
            member[x] = k
    found = sum(1 for a, b in planted if a in member and member.get(a) == member.get(b))
    # The pairs whose true shingle Jaccard reaches the threshold (one changed
    # word in a short row can take it below): the recall that matters.
    threshold = r.details["threshold"]
    similar = [(a, b) for a, b in planted if _jaccard(rows[a], rows[b]) >= threshold]
    found_sim = sum(1 for a, b in similar if a in member and member.get(a) == member.get(b))
    return [
        [
            f"{n:,}",
            f"{dt:.1f}",
            f"{n / dt:,.0f}",
            f"{found}/{len(planted)} ({found / max(1, len(planted)):.1%})",
            f"{found_sim}/{len(similar)} ({found_sim / max(1, len(similar)):.1%})",
            r.details["clusters"],
            f"{r.details['bands']}×{r.details['rows_per_band']}",
            "✓" if dt * 1_000_000 / n <= 120 else "✗",
        ]
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--near-rows", type=int, default=1_000_000)
    ap.add_argument("--skip-full", action="store_true")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    if not args.skip_full:
        print(f"\n### Full validation, chat rows ({args.rows:,}), one core\n")
        print(
            table(
                ["token counting", "rows", "s", "rows/s", "tokens/row", "≥ 20k/s"],
                bench_full(args.rows),
            )
        )
    if args.near_rows:
        print(f"\n### Near-duplicate detection ({args.near_rows:,} rows), one core\n")
        print(
            table(
                [
                    "rows",
                    "s",
                    "rows/s",
                    "planted pairs found",
                    "of those with Jaccard ≥ 0.85",
                    "clusters",
                    "bands×rows",
                    "≤ 120 s/1M",
                ],
                bench_near(args.near_rows),
            )
        )


if __name__ == "__main__":
    main()
