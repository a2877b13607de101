"""Tracked runs: metric logging through the SDK, reading curves back, artifact upload.

A real `keel up` (SQLite, or PostgreSQL with --pg) in its own process; the SDK in
this one, as a training script would use it:

- log: ``run.log_metric`` calls (the caller's cost per call, µs) and the points
  per second that reach the store (from the first call until ``end()`` returned,
  i.e. everything flushed);
- read: one key's full curve, and a comparison of two runs with curves;
- artifact: one file uploaded (MB/s), streamed to the artifact root.

    python bench/runs_tracking.py [--keys 10] [--steps 10000] [--artifact-mb 200] [--pg URL]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import keel
from _harness import keel_server, pg_database, table

CONFIG = "local:\n  enabled: false\nlog_level: warning\n"


def log_run(url: str, name: str, keys: int, steps: int, scale: float) -> tuple[str, float, float]:
    """Returns (run id, µs per log_metric call, points/s stored)."""
    t0 = time.perf_counter()
    run = keel.run(name, url=url, params={"scale": scale}, system_interval_s=1.0)
    call_s = 0.0
    for s in range(steps):
        c0 = time.perf_counter()
        for k in range(keys):
            run.log_metric(f"metric_{k}", scale / (s + 1 + k), step=s)
        call_s += time.perf_counter() - c0
    run.end()
    total = time.perf_counter() - t0
    n = keys * steps
    return run.id, call_s / n * 1e6, n / total


def timed_get(client: httpx.Client, path: str, params: dict, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        r = client.get(path, params=params)
        r.raise_for_status()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--artifact-mb", type=int, default=200)
    ap.add_argument("--pg", default=None, help="PostgreSQL admin URL: run on a throwaway db.")
    a = ap.parse_args()

    def bench(env: dict[str, str]) -> None:
        with keel_server(CONFIG, env) as (port, _pid):
            url = f"http://127.0.0.1:{port}"
            rows = []
            ids = []
            for i, scale in enumerate((1.0, 0.5)):
                rid, us, pps = log_run(url, "bench", a.keys, a.steps, scale)
                ids.append(rid)
                rows.append(
                    [
                        f"log run {i + 1}",
                        f"{a.keys * a.steps:,} points",
                        f"{us:.1f} µs/call",
                        f"{pps:,.0f} points/s stored",
                    ]
                )
            with httpx.Client(base_url=url, timeout=120) as c:
                ms = timed_get(
                    c, f"/api/runs/{ids[0]}/metrics", {"key": "metric_0", "max_points": a.steps}
                )
                rows.append(["read one curve", f"{a.steps:,} points", f"{ms:.1f} ms", ""])
                ms = timed_get(
                    c, "/api/runs/compare", {"ids": ",".join(ids), "curves": "metric_0,metric_1"}
                )
                rows.append(["compare 2 runs", "2 curves, 500 pts", f"{ms:.1f} ms", ""])
                with tempfile.TemporaryDirectory() as d:
                    f = Path(d) / "weights.bin"
                    with f.open("wb") as out:
                        block = os.urandom(1024 * 1024)
                        for _ in range(a.artifact_mb):
                            out.write(block)
                    run = keel.run("artifact", url=url, system_metrics=False)
                    t = time.perf_counter()
                    run.log_artifact(f)
                    dt = time.perf_counter() - t
                    run.end()
                rows.append(
                    [
                        "upload artifact",
                        f"{a.artifact_mb} MB",
                        f"{dt:.2f} s",
                        f"{a.artifact_mb / dt:,.0f} MB/s",
                    ]
                )
            print(table(["what", "size", "time", "throughput"], rows))

    if a.pg:
        with pg_database(a.pg) as db_url:
            bench({"KEEL_DATABASE_URL": db_url})
    else:
        bench({})


if __name__ == "__main__":
    main()
