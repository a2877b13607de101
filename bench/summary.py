"""Summary and time-series latency over a week of rollups for 10 models.

Fills the rollup tables the way the recorder does (write_rollups over synthetic
traces: every model, every minute of 7 days, with some errors and streams),
then times `summary()` and `timeseries()` — what /api/metrics/* and `keel
stats` run — on SQLite and PostgreSQL.

    python bench/summary.py [--models 10] [--days 7] [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).parent))
from _harness import pg_database, table
from keel.monitoring import summary as sm
from keel.store.engine import make_engine, migrate
from keel.store.rollups import write_rollups


def fill(engine: sa.Engine, models: int, days: int, now: int) -> int:
    start = now - days * 86_400_000
    batch: list[dict] = []
    n = 0
    for minute in range(days * 1440):
        t = start + minute * 60_000
        for m in range(models):
            for k in range(2):
                batch.append(
                    {
                        "started_at_ms": t + k,
                        "duration_ms": 50.0 + (minute * 7 + m * 13) % 900,
                        "ttft_ms": 20.0 + m if k else None,
                        "endpoint": "chat",
                        "model": f"model-{m}",
                        "provider": f"prov-{m % 3}",
                        "status": "error" if (k and minute % 10 == 0) else "ok",
                        "stream": bool(k),
                        "prompt_tokens": 300,
                        "completion_tokens": 120,
                        "total_tokens": 420,
                        "cost_usd": 0.001,
                        "user_id": f"u{m}",
                        "feature": "f",
                    }
                )
        if len(batch) >= 20_000:
            with engine.begin() as c:
                write_rollups(c, batch)
            n += len(batch)
            batch = []
    if batch:
        with engine.begin() as c:
            write_rollups(c, batch)
        n += len(batch)
    return n


def timed(fn, repeat: int) -> tuple[float, float]:
    fn()  # warm caches once, as a running server would be
    xs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t0) * 1000)
    return statistics.median(xs), max(xs)


def bench(name: str, url: str, a: argparse.Namespace, rows: list) -> None:
    engine = make_engine(url)
    migrate(engine)
    now = int(time.time() * 1000)
    t0 = time.perf_counter()
    n = fill(engine, a.models, a.days, now)
    with engine.connect() as c:
        minute_rows = c.execute(sa.text("SELECT COUNT(*) FROM rollups_minute")).scalar()
        hour_rows = c.execute(sa.text("SELECT COUNT(*) FROM rollups_hour")).scalar()
    print(
        f"{name}: {n:,} traces rolled up in {time.perf_counter() - t0:.0f}s "
        f"({minute_rows:,} minute rows, {hour_rows:,} hour rows)",
        file=sys.stderr,
    )
    cases = [
        ("summary 7d by model", lambda: sm.summary(engine, window="7d", group_by="model")),
        ("summary 24h by model", lambda: sm.summary(engine, window="24h", group_by="model")),
        ("summary 1h by model", lambda: sm.summary(engine, window="1h", group_by="model")),
        ("summary 7d by user", lambda: sm.summary(engine, window="7d", group_by="user")),
        (
            "timeseries 7d step 1h p95",
            lambda: sm.timeseries(engine, metric="latency_p95_ms", window="7d", step="1h"),
        ),
        (
            "timeseries 24h step 5m, by model",
            lambda: sm.timeseries(
                engine, metric="requests", window="24h", step="5m", group_by="model"
            ),
        ),
    ]
    check = sm.summary(engine, window="7d", group_by="model")
    assert len(check["data"]) == a.models, check["data"]
    for label, fn in cases:
        med, worst = timed(fn, a.repeat)
        rows.append([name, label, f"{med:.1f}", f"{worst:.1f}"])
    engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=10)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    a = ap.parse_args()
    rows: list = []
    with tempfile.TemporaryDirectory() as d:
        bench("SQLite", f"sqlite:///{d}/s.db", a, rows)
    with pg_database(a.pg) as url:
        bench("PostgreSQL", url, a, rows)
    print(f"summaries over {a.days} days of rollups, {a.models} models, median of {a.repeat}")
    print(table(["store", "query", "median ms", "max ms"], rows))


if __name__ == "__main__":
    main()
