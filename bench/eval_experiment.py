"""An offline experiment of 1,000 items against a zero-latency fake upstream.

A zero-delay fake upstream and `keel up` each run in their own process on
loopback; the experiment runner runs in this process against Keel's store
(SQLite, the same file Keel writes its traces to). A 1,000-row eval dataset is
imported, then a suite with exact_match + contains + json_valid runs:

1. a first run (every item calls the model through the gateway),
2. a resume of a run whose 1,000 items are all stored (the skip path),
3. a second run answered entirely from the output cache,
4. the same suite through the `keel eval run` CLI in a subprocess (process
   start, imports and migrations included), from the cache.

CPU seconds of this process (the harness), of Keel and of the fake upstream
are read from /proc, so the split says who the bottleneck is.

    python bench/eval_experiment.py [--items 1000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _harness import cpu_seconds, fake_upstream, free_port, table, wait_port
from keel.data.versions import DatasetStore
from keel.evals._transport import gateway_client
from keel.evals.runner import ExperimentRunner, RunnerOptions
from keel.evals.runs import RunStore
from keel.evals.suite import parse_suite
from keel.prompts.store import PromptStore
from keel.store.engine import make_engine, migrate

TARGET_S = 10.0
KEEL = [sys.executable, "-c", "from keel.cli import main; main()"]  # the `keel` script


def rows(n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        q = f'{{"question": {i}, "text": "what is item {i} about"}}' if i % 3 == 0 else f"q {i}"
        # Most answers match (the fake echoes); every 5th does not.
        expected = f"Echo: {q}" if i % 5 else "no"
        out.append({"input": q, "expected": expected, "metadata": {"id": f"r{i}"}})
    return out


SUITE = {
    "name": "bench",
    "dataset": "bench@latest",
    "targets": [{"name": "gpt", "model": "gpt", "params": {"temperature": 0}}],
    "evaluators": [
        {"name": "accuracy", "kind": "exact_match"},
        {"name": "mentions", "kind": "contains", "params": {"values": "Echo"}},
        {"name": "json", "kind": "json_valid"},
    ],
    "thresholds": {"accuracy": 0.7},
}


@contextlib.contextmanager
def keel_up(config_yaml: str, d: str) -> Any:
    """`keel up` in its own process, started like the `keel` script; yields (port, pid)."""
    port = free_port()
    cfg = Path(d) / "keel.yaml"
    cfg.write_text(config_yaml)
    p = subprocess.Popen(
        [*KEEL, "up", "--port", str(port), "--config", str(cfg)],
        env={**os.environ, "KEEL_LOG_LEVEL": "warning"},
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield port, p.pid
    finally:
        p.terminate()
        p.wait(30)


async def run_once(engine: Any, root: str, url: str, suite: Any, opts: RunnerOptions) -> Any:
    async with gateway_client(url, None, concurrency=opts.concurrency) as client:
        runner = ExperimentRunner(
            RunStore(engine), DatasetStore(engine, root), PromptStore(engine), client, opts
        )
        [out] = await runner.run(suite)
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d, fake_upstream() as up_port:
        db = Path(d) / "keel.db"
        art = str(Path(d) / "artifacts")
        cfg = yaml.safe_dump(
            {
                "database_url": f"sqlite:///{db}",
                "data_dir": str(Path(d) / "data"),
                "data": {"artifact_root": art},
                "local": {"enabled": False},
                "providers": {"fake": {"kind": "openai",
                                       "base_url": f"http://127.0.0.1:{up_port}/v1"}},
                "models": {"gpt": "fake/fake"},
                "prices": [{"provider": "fake", "model": "fake", "input_per_mtok": 1.0,
                            "output_per_mtok": 2.0}],
            }
        )  # fmt: skip
        with keel_up(cfg, d) as (port, keel_pid):
            url = f"http://127.0.0.1:{port}"
            engine = make_engine(f"sqlite:///{db}")
            migrate(engine)
            t0 = time.perf_counter()
            DatasetStore(engine, art).write_version("bench", "eval", rows(args.items))
            import_s = time.perf_counter() - t0
            suite = parse_suite(SUITE)
            up_pid = _pid_on(up_port)
            results = []

            def measure(name: str, opts: RunnerOptions) -> Any:
                c0, k0, u0 = time.process_time(), cpu_seconds(keel_pid), cpu_seconds(up_pid)
                t = time.perf_counter()
                out = asyncio.run(run_once(engine, art, url, suite, opts))
                wall = time.perf_counter() - t
                cpu = time.process_time() - c0
                k, u = cpu_seconds(keel_pid) - k0, cpu_seconds(up_pid) - u0
                tm = out.timings
                results.append([name, args.items, f"{wall:.2f}", f"{args.items / wall:,.0f}",
                                f"{cpu:.2f}", f"{k:.2f}", f"{u:.2f}",
                                f"{tm.get('write_s', 0):.2f}", f"{tm.get('finalize_s', 0):.2f}",
                                "✓" if wall <= TARGET_S else "✗"])  # fmt: skip
                return out

            opts = dict(concurrency=args.concurrency, progress=False)
            first = measure("first run (gateway calls)", RunnerOptions(**opts))
            assert first.summary["items"] == args.items and first.summary["errors"] == 0
            acc = first.summary["metrics"]["accuracy"]["mean"]
            with engine.begin() as c:  # make the finished run resumable again
                from keel.store.tables_quality import eval_runs

                c.execute(eval_runs.update().values(status="running"))
            res = measure("resume: 1,000 of 1,000 stored", RunnerOptions(**opts))
            assert res.resumed and res.done_before == args.items
            cached = measure("second run (all cached)", RunnerOptions(**opts, fresh=True))
            assert cached.summary["cached"] == args.items

            suite_file = Path(d) / "suite.yaml"
            suite_file.write_text(yaml.safe_dump(SUITE))
            cfg_file = Path(d) / "cli.yaml"
            cfg_file.write_text(yaml.safe_dump({"database_url": f"sqlite:///{db}",
                                                "data": {"artifact_root": art}}))  # fmt: skip
            t = time.perf_counter()
            p = subprocess.run(
                [*KEEL, "eval", "run", str(suite_file), "--url", url,
                 "--config", str(cfg_file), "--quiet", "--fresh",
                 "--concurrency", str(args.concurrency)],
                capture_output=True, text=True, env={**os.environ, "KEEL_API_KEY": ""},
            )  # fmt: skip
            cli_s = time.perf_counter() - t
            assert p.returncode == 0, p.stderr
            t = time.perf_counter()
            subprocess.run([*KEEL, "version"], capture_output=True)
            startup_s = time.perf_counter() - t

    print(f"dataset import: {args.items} rows in {import_s:.2f} s; accuracy {acc:.3f}; "
          f"concurrency {args.concurrency}; cpus {os.cpu_count()}\n")  # fmt: skip
    head = ["phase", "items", "wall s", "items/s", "harness CPU s", "keel CPU s",
            "upstream CPU s", "writes s", "finalize s", "≤ 10 s"]  # fmt: skip
    print(table(head, results))
    print(f"\n`keel eval run` CLI (cached, new run): {cli_s:.2f} s wall, of which "
          f"{startup_s:.2f} s is `keel` process start (`keel version`)")  # fmt: skip
    t = first.timings
    print(f"first run split: plan {t['plan_s']:.2f} s, items {t['items_s']:.2f} s "
          f"(sum of call latencies {t['calls_s']:.1f} s over {args.concurrency} in flight, "
          f"scoring {t['score_s']:.3f} s), writes {t['write_s']:.2f} s (off the loop), "
          f"finalize {t['finalize_s']:.2f} s")  # fmt: skip


def _pid_on(port: int) -> int:
    """The pid of the process listening on ``port`` (the fake upstream), from /proc."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[1].endswith(f":{port:04X}") and parts[3] == "0A":
            inode = parts[9]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return int(pid)
        except OSError:
            continue
    raise RuntimeError(f"no process listens on {port}")


if __name__ == "__main__":
    main()
