"""Cost of evaluating 500 alert rules over 7 days of rollups, every 15 s.

The store is filled like bench/summary.py (10 models, every minute of 7 days).
The rules are a realistic mix: 17 rollup signals × several windows (5m, 15m,
1h, 24h), grouped by model, by provider, ungrouped and filtered to one model,
some in `change` mode (against a day earlier) and `rate` mode, plus resource
and component rules. One evaluation round runs the whole engine (signals,
state machine, persisting states and events), exactly as the daemon does.

    python bench/alerts.py [--rules 500] [--rounds 10]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import keel.alerts.sources  # noqa: F401
from _harness import pg_database, table
from keel.alerts.engine import RuleEvaluator
from keel.config import AlertsSettings
from keel.store.engine import make_engine, migrate
from summary import fill

ROLLUP = [
    "requests",
    "rps",
    "errors",
    "error_rate",
    "latency_mean_ms",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "ttft_p99_ms",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "tokens_per_minute",
    "cost_usd",
    "cost_per_hour_usd",
]
OTHER = [
    ("process_cpu_percent", ["instance"]),
    ("host_mem_used_percent", ["instance"]),
    ("component_down_seconds", ["component"]),
    ("recorder_dropped", ["instance"]),
    ("no_traffic", ["model"]),
]


def rules(n: int) -> list[dict]:
    out = []
    shapes = [
        {"group_by": ["model"]},
        {"group_by": ["provider"]},
        {},
        {"filters": {"model": "model-3"}},
    ]
    windows = ["5m", "15m", "1h", "24h"]
    modes = [
        {"mode": "value"},
        {"mode": "value"},
        {"mode": "change", "compare_to": "1d"},
        {"mode": "rate"},
    ]
    combos = itertools.cycle(itertools.product(ROLLUP, windows, shapes, modes))
    for i in range(n):
        if i % 10 == 9:
            sig, group = OTHER[i % len(OTHER)]
            out.append(
                {
                    "name": f"r{i}",
                    "signal": sig,
                    "window": "5m",
                    "group_by": group,
                    "condition": {"op": "above", "threshold": 1e12},
                }
            )
            continue
        sig, window, shape, mode = next(combos)
        out.append(
            {
                "name": f"r{i}",
                "signal": sig,
                "window": window,
                **shape,
                "condition": {"op": "above", "threshold": 1e12, **mode},
            }
        )
    return out


def run(name: str, url: str, a: argparse.Namespace, rows: list) -> None:
    engine = make_engine(url)
    migrate(engine)
    now = int(time.time() * 1000)
    fill(engine, 10, a.days, now)
    settings = AlertsSettings.model_validate({"rules": rules(a.rules)})
    ev = RuleEvaluator(engine, settings, "http://127.0.0.1:4000")
    ev.evaluate(int(time.time() * 1000))  # first round creates nothing (no rule fires)
    cpu, wall = [], []
    for _ in range(a.rounds):
        c0, t0 = time.thread_time(), time.perf_counter()
        _, counts = ev.evaluate(int(time.time() * 1000))
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
    assert counts["rules"] == a.rules, counts
    distinct = len({(r.signal, r.window, r.condition.mode) for r in settings.rules})
    med_cpu = statistics.median(cpu)
    rows.append(
        [
            name,
            a.rules,
            distinct,
            f"{statistics.median(wall) * 1000:.0f}",
            f"{med_cpu * 1000:.0f}",
            f"{med_cpu / a.interval * 100:.2f} %",
        ]
    )
    engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--interval", type=float, default=15.0)
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    a = ap.parse_args()
    rows: list = []
    with tempfile.TemporaryDirectory() as d:
        run("SQLite", f"sqlite:///{d}/a.db", a, rows)
    with pg_database(a.pg) as url:
        run("PostgreSQL", url, a, rows)
    print(
        f"alert evaluation: {a.rules} rules over {a.days} days of rollups (10 models), "
        f"median of {a.rounds} rounds, on {os.cpu_count()} cores"
    )
    print(
        table(
            [
                "store",
                "rules",
                "distinct signal×window×mode",
                "wall ms/round",
                "Keel CPU ms/round",
                f"share of one core at {a.interval:.0f} s",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
