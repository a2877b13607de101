"""Online evaluation: scheduler scan rate, worker throughput, concurrent claims.

    python bench/online_evals.py                  # SQLite and (if reachable) PostgreSQL
    python bench/online_evals.py --traces 20000   # smaller

Per store, prints:
1. scheduling: traces scanned and jobs queued per second (two evaluators, sample
   rates 1.0 and 0.1), ticks of ``online_batch_size`` traces;
2. working: jobs scored per second by one worker (``length`` evaluator; score,
   rollup and job state written per job in one transaction);
3. PostgreSQL only: four threads claiming from one queue (``FOR UPDATE SKIP
   LOCKED``): claims per second and jobs taken twice (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import pg_database, table
from keel._ids import new_id
from keel.config.quality import EvalsSettings
from keel.daemon import now_ms
from keel.evals import online_queue as q
from keel.evals.online import OnlineMetrics, OnlineScheduler, OnlineWorker
from keel.store.engine import make_engine, migrate
from keel.store.tables import traces
from keel.store.tables_quality import eval_jobs, scores

PG = os.environ.get("KEEL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def seed(engine: sa.Engine, n: int) -> None:
    t0 = now_ms() - 3_600_000
    req = orjson.dumps({"model": "gpt", "messages": [{"role": "user", "content": "q"}]}).decode()
    resp = orjson.dumps({"choices": [{"message": {"role": "assistant", "content": "an answer"}}]})
    rows = [
        {
            "id": new_id(), "started_at_ms": t0 + i * 10, "duration_ms": 20.0,
            "endpoint": "chat", "model": "gpt", "status": "ok", "http_status": 200,
            "stream": False, "tokens_estimated": False, "request_body": req,
            "response_body": resp.decode(),
        }
        for i in range(n)
    ]  # fmt: skip
    with engine.begin() as c:
        for i in range(0, n, 5000):
            c.execute(sa.insert(traces), rows[i : i + 5000])


def settings(**over: Any) -> EvalsSettings:
    base = {
        "online": [
            {"name": "all", "evaluator": "length", "params": {"max_chars": 100},
             "sample_rate": 1.0, "max_per_day": None},
            {"name": "tenth", "evaluator": "length", "params": {"max_chars": 100},
             "sample_rate": 0.1, "max_per_day": None},
        ],
        "online_settle_s": 0,
        "online_backfill_s": 7200,
    }  # fmt: skip
    return EvalsSettings.model_validate({**base, **over})


def bench_store(url: str, n: int, label: str) -> list[list[Any]]:
    engine = make_engine(url)
    migrate(engine)
    seed(engine, n)
    out: list[list[Any]] = []
    ev = settings()
    sched = OnlineScheduler(engine, ev, OnlineMetrics(None))
    t = time.perf_counter()
    scanned = queued = 0
    while True:
        r = sched.schedule_once()
        scanned += r["scanned"]
        queued += r["queued"]
        if r["scanned"] == 0:
            break
    dt = time.perf_counter() - t
    out.append([label, "schedule", f"{scanned} traces", f"{scanned / dt:,.0f} traces/s",
                f"{queued / dt:,.0f} jobs/s"])  # fmt: skip

    # Score only the 10 % evaluator's jobs (and a slice of the other) so runs stay short.
    with engine.begin() as c:
        c.execute(sa.update(eval_jobs).where(eval_jobs.c.evaluator == "all")
                  .values(status="skipped"))  # fmt: skip
    jobs = sum(v.get("pending", 0) for v in q.counts(engine).values())
    for conc in (1, 8):
        with engine.begin() as c:
            c.execute(sa.delete(scores))
            c.execute(sa.update(eval_jobs).where(eval_jobs.c.evaluator == "tenth")
                      .values(status="pending", attempts=0))  # fmt: skip
        worker = OnlineWorker(engine, settings(online_concurrency=conc), OnlineMetrics(None))
        t = time.perf_counter()
        asyncio.run(worker.tick())
        dt = time.perf_counter() - t
        with engine.connect() as c:
            done = c.execute(sa.select(sa.func.count()).select_from(scores)).scalar()
        assert done == jobs, (done, jobs)
        out.append([label, f"work (concurrency {conc})", f"{jobs} jobs",
                    f"{jobs / dt:,.0f} jobs/s", "-"])  # fmt: skip
    engine.dispose()
    return out


def bench_claims(url: str, n: int) -> list[Any]:
    engine = make_engine(url, pool_size=8)
    migrate(engine)
    t0 = now_ms()
    with engine.begin() as c:
        rows = [
            {"id": new_id(), "trace_id": new_id(), "evaluator": "e", "status": "pending",
             "attempts": 0, "next_attempt_ms": t0, "created_at_ms": t0}
            for _ in range(n)
        ]  # fmt: skip
        for i in range(0, n, 5000):
            c.execute(sa.insert(eval_jobs), rows[i : i + 5000])
    taken: list[list[str]] = [[] for _ in range(4)]

    def work(i: int) -> None:
        while batch := q.claim(engine, f"w{i}", 16, now_ms(), 60_000, 5):
            taken[i] += [j.id for j in batch]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t
    all_ids = [x for part in taken for x in part]
    engine.dispose()
    return ["postgresql", "4 threads claim", f"{n} jobs", f"{n / dt:,.0f} claims/s",
            f"taken twice: {len(all_ids) - len(set(all_ids))}"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", type=int, default=50_000)
    args = ap.parse_args()
    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory() as d:
        rows += bench_store(f"sqlite:///{d}/keel.db", args.traces, "sqlite")
    try:
        with pg_database(PG) as url:
            rows += bench_store(url, args.traces, "postgresql")
        with pg_database(PG) as url:
            rows.append(bench_claims(url, 20_000))
    except sa.exc.OperationalError as e:
        print(f"(PostgreSQL skipped: {e.__class__.__name__})")
    print(table(["store", "step", "size", "rate", "jobs queued"], rows))


if __name__ == "__main__":
    main()
