"""Drift monitoring: test speed, false-positive rate and detection power.

    python bench/drift.py                 # everything (a few minutes on 2 cores)
    python bench/drift.py --seeds 20      # quicker FPR / power estimates

Prints one table per part:
1. numeric tests on 100k vs 100k values (target: ≤ 50 ms per feature, all tests);
2. categorical tests on 100k vs 100k labels;
3. embedding tests on 10k vs 10k 384-d vectors (target: ≤ 2 s per feature);
4. language detection per text;
5. a whole monitor run from SQLite (100k traces a side, 2k embeddings a side);
6. the run-level false-positive rate on identically distributed traffic, and the
   detection power on synthetic shifts (topic, language, length), over seeds,
   with real MiniLM embeddings of synthetic support questions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from keel.config import DriftMonitorSettings, DriftSettings, Settings
from keel.drift import synthetic
from keel.drift.features import Embedder, encode_vector
from keel.drift.language import detect_language
from keel.drift.monitor import DriftRunner
from keel.drift.reference import Sample
from keel.drift.tests import DRIFT_TESTS, TestConfig

ALPHA_T = 0.01 / 12  # a typical run: 12 decisions at alpha 0.01


def timed(fn: Any, *args: Any, repeat: int = 5) -> float:
    """Median wall time of ``fn(*args)`` in ms (after one warm-up call)."""
    fn(*args)
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args)
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


def table(head: list[str], rows: list[list[Any]]) -> None:
    cells = [head, *[[str(c) for c in r] for r in rows]]
    w = [max(len(r[i]) for r in cells) for i in range(len(head))]
    for k, r in enumerate(cells):
        print("| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |")
        if k == 0:
            print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    print()


def part_numeric() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(5, 1, 100_000), rng.lognormal(5, 1, 100_000)
    cfg = TestConfig(alpha=ALPHA_T)
    rows = []
    for name in ("psi", "ks", "wasserstein"):
        t = DRIFT_TESTS[name](cfg)
        # Fresh copies: the KS/Wasserstein memo must not serve a repeat.
        rows.append([name, f"{timed(lambda t=t: t.run(a.copy(), b)):.1f}"])

    def feature() -> None:
        x = a.copy()
        for name in ("psi", "ks", "wasserstein"):
            DRIFT_TESTS[name](cfg).run(x, b)

    ms = timed(feature)
    rows.append(["feature (all three)", f"{ms:.1f}", "✓" if ms <= 50 else "✗"])
    print("numeric tests, 100,000 vs 100,000 values (ms, median of 5)\n")
    table(["test", "ms", "≤ 50 ms"], [r + [""] * (3 - len(r)) for r in rows])


def part_categorical() -> None:
    rng = np.random.default_rng(1)
    langs, p = ["en", "fr", "es", "de", "unknown"], [0.7, 0.1, 0.1, 0.05, 0.05]
    a, b = rng.choice(langs, 100_000, p=p).tolist(), rng.choice(langs, 100_000, p=p).tolist()
    cfg = TestConfig(alpha=ALPHA_T)
    rows = [[n, f"{timed(DRIFT_TESTS[n](cfg).run, a, b):.1f}"] for n in ("chi2", "js")]
    print("categorical tests, 100,000 vs 100,000 labels (ms)\n")
    table(["test", "ms"], rows)


def clustered(n: int, rng: np.random.Generator, centers: np.ndarray, p: np.ndarray) -> np.ndarray:
    k = rng.choice(len(centers), n, p=p)
    x = centers[k] + rng.normal(scale=1.2, size=(n, centers.shape[1])).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def part_embeddings() -> None:
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(10, 384)).astype(np.float32)
    p = np.full(10, 0.1)
    shifted = np.array([0.04] * 5 + [0.16] * 5)
    x, y, z = (
        clustered(10_000, rng, centers, p),
        clustered(10_000, rng, centers, p),
        clustered(10_000, rng, centers, shifted),
    )
    cfg = TestConfig(alpha=ALPHA_T)
    rows = []
    for label, cur in (("same distribution", y), ("shifted topics", z)):
        mmd = timed(DRIFT_TESTS["mmd"](cfg).run, x, cur, repeat=3)
        topic = timed(DRIFT_TESTS["topic"](cfg).run, x, cur, repeat=3)
        res = DRIFT_TESTS["mmd"](cfg).run(x, cur)
        rows.append(
            [
                label,
                f"{mmd:.0f}",
                res.details["permutations"],
                f"{topic:.0f}",
                f"{mmd + topic:.0f}",
                "✓" if mmd + topic <= 2000 else "✗",
            ]
        )
    print("embedding tests, 10,000 vs 10,000 vectors of 384 dimensions (ms)\n")
    table(["data", "MMD", "permutations", "topics", "feature", "≤ 2 s"], rows)


def part_language() -> None:
    rng = np.random.default_rng(3)
    texts = synthetic.mix(
        [("billing", "en", 0.6), ("billing", "fr", 0.2), ("billing", "es", 0.2)], 2000, rng
    )
    detect_language("warm up the model once")
    t = time.perf_counter()
    for q in texts:
        detect_language(q)
    us = (time.perf_counter() - t) / len(texts) * 1e6
    print("language detection (py3langid), 2,000 questions of ~12 words\n")
    table(["µs per text", "texts/s"], [[f"{us:.0f}", f"{1e6 / us:,.0f}"]])


def part_store() -> None:
    from keel.store.engine import make_engine, migrate
    from keel.store.tables_quality import trace_features

    rng = np.random.default_rng(4)
    now = 1_900_000_000_000
    hour, week = 3_600_000, 7 * 86_400_000
    with tempfile.TemporaryDirectory() as d:
        s = Settings.model_validate(
            {"data_dir": d, "drift": {"monitors": [{"name": "m", "window": "1h"}]}}
        )
        engine = make_engine(s.effective_database_url)
        migrate(engine)
        centers = rng.normal(size=(8, 384)).astype(np.float32)
        for start in (now - hour, now - hour - week):
            n = 100_000
            emb = clustered(2_000, rng, centers, np.full(8, 1 / 8))
            rows = [
                {
                    "trace_id": f"{start}-{i}",
                    "started_at_ms": int(start + i * hour // n),
                    "model": "gpt",
                    "input_tokens": int(rng.poisson(40)),
                    "output_tokens": int(rng.poisson(90)),
                    "latency_ms": float(rng.lognormal(6, 0.4)),
                    "language": "en",
                    "refusal": False,
                    "input_text": "a question",
                    "input_embedding": encode_vector(emb[i]) if i < 2000 else None,
                    "output_embedding": encode_vector(emb[i]) if i < 2000 else None,
                }
                for i in range(n)
            ]
            with engine.begin() as conn:
                conn.execute(trace_features.insert(), rows)
        runner = DriftRunner(engine, s.drift, Embedder(enabled=False))
        t = time.perf_counter()
        run = runner.compute("m", now)
        ms = (time.perf_counter() - t) * 1000
    print("one monitor run from SQLite: 100,000 vs 100,000 traces, 2,000 embeddings a side\n")
    table(
        ["s", "features", "drifted"],
        [[f"{ms / 1000:.2f}", len(run["report"]["features"]), run["drifted"]]],
    )


# -- false positives and power --------------------------------------------------------


class Pool:
    """Synthetic questions, featurized once (real MiniLM embeddings), sampled per seed."""

    def __init__(self, embedder: Embedder, rng: np.random.Generator) -> None:
        spec = {
            "billing": ("billing", "en", False, 800),
            "shipping": ("shipping", "en", False, 300),
            "french": ("billing", "fr", False, 150),
            "spanish": ("billing", "es", False, 150),
            "long": ("billing", "en", True, 300),
        }
        self.texts: dict[str, list[str]] = {}
        self.vecs: dict[str, np.ndarray] = {}
        self.langs: dict[str, list[str]] = {}
        for key, (topic, lang, long, n) in spec.items():
            texts = synthetic.questions(topic, n, rng, lang=lang, long=long)
            self.texts[key] = texts
            self.langs[key] = [detect_language(t) for t in texts]
            vecs = embedder.embed(texts)
            assert vecs is not None, embedder.reason
            self.vecs[key] = vecs

    def sample(self, parts: dict[str, float], n: int, rng: np.random.Generator) -> Sample:
        keys = list(parts)
        counts = rng.multinomial(n, np.array([parts[k] for k in keys]))
        texts, langs, vecs = [], [], []
        for key, k in zip(keys, counts, strict=True):
            idx = rng.integers(0, len(self.texts[key]), int(k))
            texts += [self.texts[key][i] for i in idx]
            langs += [self.langs[key][i] for i in idx]
            vecs.append(self.vecs[key][idx])
        words = np.array([len(t.split()) for t in texts], dtype=float)
        emb = np.vstack(vecs)
        return Sample(
            n=n,
            numeric={
                "input_tokens": words + 3,
                "output_tokens": words + 1,  # the fake upstream echoes the question
                "latency_ms": rng.lognormal(6, 0.4, n),
                "retrieval_top_score": np.full(n, np.nan),
                "retrieval_count": np.full(n, np.nan),
            },
            categorical={
                "language": langs,
                "refusal": ["false"] * n,
                "model": ["gpt"] * n,
            },
            # An echo's embedding is its question's: the pool is embedded once.
            embeddings={"input_embedding": emb, "output_embedding": emb},
            texts={"input_embedding": texts, "output_embedding": texts},
        )


SCENARIOS = {
    "none (same distribution)": ({"billing": 1.0}, None),
    "topic: 30% shipping": ({"billing": 0.7, "shipping": 0.3}, "input_embedding"),
    "language: 30% fr/es": ({"billing": 0.7, "french": 0.15, "spanish": 0.15}, "language"),
    "length: 50% long": ({"billing": 0.5, "long": 0.5}, "input_tokens"),
}


def part_rates(seeds: int, sizes: list[int]) -> None:
    if seeds <= 0:
        return
    embedder = Embedder()
    if not embedder.available:
        print(f"FPR / power skipped: {embedder.reason}\n")
        return
    t = time.perf_counter()
    pool = Pool(embedder, np.random.default_rng(5))
    print(f"(pool of {sum(len(v) for v in pool.texts.values())} questions embedded in "
          f"{time.perf_counter() - t:.0f} s)\n")  # fmt: skip
    settings = DriftSettings()
    runner = DriftRunner(None, settings, embedder)  # type: ignore[arg-type]
    monitor = DriftMonitorSettings(name="bench")
    rows = []
    for n in sizes:
        for label, (parts, expect) in SCENARIOS.items():
            hits = named = 0
            t = time.perf_counter()
            for seed in range(seeds):
                rng = np.random.default_rng(1000 + seed)
                ref = pool.sample({"billing": 1.0}, n, rng)
                cur = pool.sample(parts, n, rng)
                rep = runner.compare(monitor, ref, cur, seed)
                hits += rep["drifted"]
                named += expect in rep["drifted_features"] if expect else 0
            per_run = (time.perf_counter() - t) / seeds * 1000
            rate = f"{hits}/{seeds} ({hits / seeds:.0%})"
            right = f"{named}/{seeds}" if expect else "-"
            rows.append([n, label, rate, expect or "-", right, f"{per_run:.0f}"])
    print(f"run-level drift calls over {seeds} seeds (alpha {settings.alpha}, Bonferroni)\n")
    table(
        ["traces a side", "shift", "runs called drifted", "expected feature", "named", "ms/run"],
        rows,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=100, help="Seeds for FPR and power (0: skip).")
    ap.add_argument("--sizes", default="60,300", help="Traces a side, comma-separated.")
    ap.add_argument("--skip-store", action="store_true", help="Skip the SQLite run.")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        print(f"cores: {len(cores)}\n")
    part_numeric()
    part_categorical()
    part_embeddings()
    part_language()
    if not args.skip_store:
        part_store()
    part_rates(args.seeds, [int(x) for x in args.sizes.split(",")])


if __name__ == "__main__":
    main()
