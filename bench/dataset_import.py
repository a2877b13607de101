"""Dataset throughput: importing a chat JSONL into a version, then preparing it.

Rows are short support conversations (system, user, assistant; ≈300 bytes),
5 % of them exact duplicates. Import = read + map + hash + Parquet write;
prepare = read the version back + normalize + dedupe + split + write.

    python bench/dataset_import.py [--rows 200000]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).parent))
from _harness import table
from keel.data import DatasetStore, prepare
from keel.data.io import canonical_rows, read_file
from keel.store.engine import make_engine, migrate

WORDS = "the quick brown fox jumps over lazy dog refund order shipping invoice account".split()


def text(rnd: random.Random, n: int) -> str:
    return " ".join(rnd.choice(WORDS) for _ in range(n))


def make_file(path: Path, n: int) -> int:
    rnd = random.Random(7)
    with path.open("wb") as f:
        for i in range(n):
            j = rnd.randrange(i) if i and rnd.random() < 0.05 else i
            r = random.Random(j)
            row = {
                "messages": [
                    {"role": "system", "content": "You are a support assistant."},
                    {"role": "user", "content": f"#{j} " + text(r, 20)},
                    {"role": "assistant", "content": text(r, 25)},
                ],
                "metadata": {"topic": r.choice(["billing", "shipping", "returns"])},
            }
            f.write(orjson.dumps(row) + b"\n")
    return path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "chat.jsonl"
        size = make_file(src, a.rows)
        engine = make_engine(f"sqlite:///{d}/keel.db")
        migrate(engine)
        store = DatasetStore(engine, f"{d}/artifacts")
        t0 = time.perf_counter()
        v = store.write_version("bench", "chat", canonical_rows(read_file(str(src)), "chat"))
        t_import = time.perf_counter() - t0
        steps = ["normalize", "dedupe", "split:train=0.8,validation=0.1,test=0.1,seed=42"]
        t0 = time.perf_counter()
        p = prepare(store, v, steps)
        t_prep = time.perf_counter() - t0
        t0 = time.perf_counter()
        sp = prepare(store, v, [*steps[:2], steps[2] + ",stratify_by=topic"])
        t_strat = time.perf_counter() - t0
        engine.dispose()
    print(f"dataset import/prepare: {a.rows} chat rows, {size / 1e6:.0f} MB of JSONL")
    rows = [
        ["import (jsonl → version)", a.rows, v.rows, f"{t_import:.2f}",
         f"{a.rows / t_import:,.0f}"],
        ["prepare normalize+dedupe+split", v.rows, p.rows, f"{t_prep:.2f}",
         f"{v.rows / t_prep:,.0f}"],
        ["… with stratify_by (2 passes)", v.rows, sp.rows, f"{t_strat:.2f}",
         f"{v.rows / t_strat:,.0f}"],
    ]  # fmt: skip
    print(table(["stage", "rows in", "rows out", "seconds", "rows/s"], rows))


if __name__ == "__main__":
    main()
