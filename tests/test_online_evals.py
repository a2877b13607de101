"""Online evaluation of production traffic: a real Keel, the real fake upstream, a real store.

Traffic goes through the gateway; the scheduler queues sampled jobs; the worker
scores them (deterministic evaluators, Python functions defined below, and an
LLM judge served by the fake upstream's ``reply=`` directive).
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
import yaml
from click.testing import CliRunner

from conftest import KeelServer, make_settings
from keel.app import create_app
from keel.cli import cli
from keel.daemon import now_ms
from keel.errors import ConfigError
from keel.evals import online_queue as q
from keel.evals.online import backoff_ms, sampled
from keel.store.engine import make_engine, migrate
from keel.store.tables_quality import eval_jobs

FAST = {
    "online_interval_s": 0.1,
    "online_settle_s": 0,
    "retry_backoff_s": 0.05,
    "retry_backoff_max_s": 0.2,
}


def online(*evaluators: dict[str, Any], **over: Any) -> dict[str, Any]:
    return {"evals": {**FAST, "online": list(evaluators), **over}}


def length(name: str, **over: Any) -> dict[str, Any]:
    return {
        "name": name,
        "evaluator": "length",
        "params": {"max_chars": 1000},
        "sample_rate": 1.0,
        **over,
    }


def python(name: str, fn: str, **over: Any) -> dict[str, Any]:
    kwargs = over.pop("kwargs", {})
    return {
        "name": name,
        "evaluator": "python",
        "sample_rate": 1.0,
        "params": {"function": f"test_online_evals:{fn}", "kwargs": kwargs},
        **over,
    }


def judgment(score: int, reasoning: str = "looks right") -> str:
    """A message whose fake-upstream directive makes every call that carries it (the
    production call and the judge's, which quotes it) answer with this judgment."""
    raw = orjson.dumps({"reasoning": reasoning, "score": score})
    return f"q{score} [[fake: reply={base64.urlsafe_b64encode(raw).decode().rstrip('=')}]]"


def chat(keel: KeelServer, content: str, model: str = "gpt", feature: str | None = None) -> str:
    headers = {"X-Keel-Feature": feature} if feature else {}
    r = httpx.post(
        keel.url + "/v1/chat/completions",
        headers=headers,
        timeout=10,
        json={"model": model, "messages": [{"role": "user", "content": content}]},
    )
    return r.headers["x-keel-trace-id"]


def wait_for(fn: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        out = fn()
        if out:
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def jobs(keel: KeelServer, evaluator: str | None = None) -> list[dict[str, Any]]:
    where = f"WHERE evaluator = '{evaluator}'" if evaluator else ""
    return keel.rows("eval_jobs", where)


def settled(keel: KeelServer, n: int, evaluator: str | None = None) -> bool:
    js = jobs(keel, evaluator)
    return len(js) >= n and all(j["status"] in ("done", "failed", "skipped") for j in js)


# -- evaluators the worker imports from this module ------------------------------------

CALLS: dict[str, int] = {}
_lock = threading.Lock()


def _count(key: str) -> int:
    with _lock:
        CALLS[key] = CALLS.get(key, 0) + 1
        return CALLS[key]


async def slow(case: Any, delay_s: float = 0.4, tag: str = "slow") -> float:
    _count(f"{tag}:{case.trace_id}")
    await asyncio.sleep(delay_s)
    return 0.5


def flaky(case: Any, fail_times: int = 2) -> dict[str, Any]:
    n = _count(f"flaky:{case.trace_id}")
    if n <= fail_times:
        raise RuntimeError(f"flaky failure {n}")
    return {"value": 1.0, "passed": True}


def always_fails(case: Any) -> float:
    raise RuntimeError("the evaluator is broken")


# -- scheduling and scoring --------------------------------------------------------------


def test_sampled_traffic_is_scored_filtered_and_rolled_up(keel_factory):
    keel = keel_factory(
        **online(
            length("len"),
            length("half", sample_rate=0.5),
            length("claude-only", models=["claude"]),
            length("support-only", features=["support"]),
            length("with-errors", include_errors=True),
        )
    )
    plain = [chat(keel, f"hello {i}") for i in range(30)]
    support = [chat(keel, f"help {i}", feature="support") for i in range(4)]
    claude = [chat(keel, f"bonjour {i}", model="claude") for i in range(3)]
    experiment = [chat(keel, "suite item", feature="eval:suite-a") for _ in range(2)]
    own = [chat(keel, "judging", feature="keel:judge:other") for _ in range(2)]
    failed = chat(keel, "boom [[fake: error=500]]")
    prod = plain + support + claude
    # A trace's jobs for every evaluator are queued together: once with-errors has all of
    # its jobs, so has every other evaluator; then wait for all of them to finish.
    wait_for(lambda: len(jobs(keel, "with-errors")) == len(prod) + 1, what="with-errors jobs")
    wait_for(lambda: settled(keel, 2 * len(prod) + 1), what="every job to finish")

    def traced(name: str) -> set[str]:
        return {j["trace_id"] for j in jobs(keel, name)}

    assert traced("len") == set(prod)  # no experiment, judge or failed call
    assert not (set(experiment) | set(own)) & {j["trace_id"] for j in jobs(keel)}
    assert traced("with-errors") == set(prod) | {failed}
    assert traced("claude-only") == set(claude)
    assert traced("support-only") == set(support)
    half = traced("half")
    assert half == {t for t in prod if sampled(t, "half", 0.5)}  # deterministic
    assert 0.25 * len(prod) < len(half) < 0.75 * len(prod)
    assert all(j["status"] == "done" and j["attempts"] == 1 for j in jobs(keel))

    scores = keel.rows("scores")
    by_trace: dict[tuple[str, str], int] = {}
    for s in scores:
        by_trace[(s["trace_id"], s["name"])] = by_trace.get((s["trace_id"], s["name"]), 0) + 1
    assert set(by_trace.values()) == {1}
    err = next(s for s in scores if s["trace_id"] == failed)
    assert err["value"] is None and "no output" in orjson.loads(err["details"])["error"]

    # scores are attached to the trace, in the API and in the trace detail
    got = httpx.get(f"{keel.url}/api/traces/{support[0]}/scores").json()["data"]
    assert {s["name"] for s in got} >= {"len", "support-only", "with-errors"}
    s0 = next(s for s in got if s["name"] == "len")
    assert s0["source"] == "online" and s0["evaluator"] == "length" and s0["passed"] is True
    assert s0["value"] == 1.0 and s0["model"] == "gpt" and s0["details"]["chars"] > 0
    detail = httpx.get(f"{keel.url}/api/traces/{support[0]}").json()
    assert {s["id"] for s in detail["scores"]} == {s["id"] for s in got}
    assert httpx.get(f"{keel.url}/api/traces/nope/scores").status_code == 404

    # … and rolled up per minute: count = scores with a value, passed/failed outcomes
    roll = keel.rows("score_rollups_minute", "WHERE name = 'with-errors'")
    assert sum(r["count"] for r in roll) == len(prod)  # the failed call's score has no value
    assert sum(r["passed"] for r in roll) == len(prod) and sum(r["failed"] for r in roll) == 0
    models = {
        r["model"]: r["count"] for r in keel.rows("score_rollups_minute", "WHERE name = 'len'")
    }
    assert models == {"gpt": 34, "claude": 3}
    ts = httpx.get(
        f"{keel.url}/api/evals/scores/timeseries", params={"name": "len", "step": "1h"}
    ).json()
    assert sum(p["count"] for p in ts["data"]) == len(prod)
    for bad_step in ("30s", "soon"):
        r = httpx.get(
            f"{keel.url}/api/evals/scores/timeseries", params={"name": "len", "step": bad_step}
        )
        assert r.status_code == 400 and "step" in r.json()["error"]["message"]
    assert all(p["mean"] == 1.0 and p["pass_rate"] == 1.0 for p in ts["data"])

    # listing, filters, cursor pagination
    seen, cursor = [], None
    while True:
        params = {"name": "len", "limit": 10, **({"cursor": cursor} if cursor else {})}
        page = httpx.get(f"{keel.url}/api/evals/scores", params=params).json()
        seen += [s["trace_id"] for s in page["data"]]
        if not (cursor := page["next_cursor"]):
            break
    assert sorted(seen) == sorted(prod)
    only = httpx.get(f"{keel.url}/api/evals/scores", params={"model": "claude", "name": "len"})
    assert {s["trace_id"] for s in only.json()["data"]} == set(claude)
    bad = httpx.get(f"{keel.url}/api/evals/scores", params={"cursor": "garbage"})
    assert bad.status_code == 400

    status = {e["name"]: e for e in httpx.get(f"{keel.url}/api/evals/online").json()["data"]}
    assert status["len"]["jobs"]["done"] == len(prod) and status["len"]["jobs"]["pending"] == 0
    assert status["len"]["today"]["evaluations"] == len(prod)
    metrics = httpx.get(f"{keel.url}/metrics").text
    assert 'keel_online_eval_jobs_total{evaluator="len",outcome="done"} 37.0' in metrics


def test_judge_scores_and_its_own_calls_are_not_scored(keel_factory):
    judge = {
        "name": "quality",
        "evaluator": "llm_judge",
        "sample_rate": 1.0,
        "params": {"model": "gpt", "scale": "1-5"},
    }
    keel = keel_factory(**online(judge, length("len")))
    ids = {chat(keel, judgment(s)): s for s in (1, 3, 5)}
    wait_for(lambda: settled(keel, 3, "quality") and settled(keel, 3, "len"), what="judge")
    time.sleep(0.5)  # a few more scheduler ticks over the judge's own traces
    judge_calls = keel.rows("traces", "WHERE feature = 'keel:judge:quality'")
    assert len(judge_calls) == 3
    assert {j["trace_id"] for j in jobs(keel)} == set(ids)  # the judge's calls are not scored
    for tid, s in ids.items():
        got = httpx.get(f"{keel.url}/api/traces/{tid}/scores").json()["data"]
        q_ = next(x for x in got if x["name"] == "quality")
        assert q_["value"] == pytest.approx((s - 1) / 4)
        assert q_["details"]["reasoning"] == "looks right"
        assert q_["details"]["judge_model"] == "gpt"
        assert q_["details"]["prompt"].startswith("keel-judge-correctness@")
        assert q_["details"]["trace_ids"][0] in {t["id"] for t in judge_calls}


def test_uncaptured_bodies_are_skipped_with_the_reason(keel_factory):
    keel = keel_factory(recorder={"capture_bodies": False}, **online(length("len")))
    tid = chat(keel, "hi")
    wait_for(lambda: settled(keel, 1), what="job")
    (job,) = jobs(keel)
    assert job["trace_id"] == tid and job["status"] == "skipped"
    assert "not captured" in job["last_error"]
    assert keel.rows("scores") == []


# -- durability --------------------------------------------------------------------------


def _server(fake: Any, data_dir: Path, **over: Any) -> KeelServer:
    return KeelServer(make_settings(fake, data_dir, **over)).start()


def test_restart_and_stale_claims_never_double_score(fake, tmp_path):
    cfg = online(
        python("slow", "slow", kwargs={"delay_s": 0.4, "tag": "restart"}), online_concurrency=2
    )
    a = _server(fake, tmp_path, **cfg)
    try:
        ids = [chat(a, f"m{i}") for i in range(8)]
        wait_for(lambda: a.rows("scores"), what="a first score")
    finally:
        a.stop()  # while jobs are running and pending
    engine = make_engine(f"sqlite:///{tmp_path / 'keel.db'}")
    with engine.begin() as c:
        st = [r.status for r in c.execute(sa.select(eval_jobs.c.status))]
        assert "running" not in st  # a clean stop hands its claims back
        assert st.count("pending") >= 2, st
        done = [
            r.trace_id
            for r in c.execute(sa.select(eval_jobs.c.trace_id).where(eval_jobs.c.status == "done"))
        ]
        pending = [
            r.trace_id
            for r in c.execute(
                sa.select(eval_jobs.c.trace_id).where(eval_jobs.c.status == "pending")
            )
        ]
        # A worker that crashed mid-evaluation: its claim is still running, in the past.
        c.execute(
            sa.update(eval_jobs)
            .where(eval_jobs.c.trace_id == pending[0])
            .values(status="running", attempts=1, claimed_by="dead", claimed_until_ms=1)
        )
        # A crash after the score was written (the score and the job's done commit together,
        # so this cannot happen; a reclaimed job that is run twice must still score once).
        c.execute(
            sa.update(eval_jobs)
            .where(eval_jobs.c.trace_id == done[0])
            .values(status="running", claimed_by="dead", claimed_until_ms=1)
        )
    engine.dispose()
    b = _server(fake, tmp_path, **cfg)
    try:
        wait_for(lambda: settled(b, 8), what="all jobs after the restart")
        wait_for(lambda: CALLS.get(f"restart:{done[0]}", 0) >= 2, what="the re-run")
        scores = b.rows("scores")
        assert sorted(s["trace_id"] for s in scores) == sorted(ids)  # exactly once each
        roll = b.rows("score_rollups_minute")
        assert sum(r["count"] for r in roll) == 8 and sum(r["value_sum"] for r in roll) == 4.0
        js = {j["trace_id"]: j for j in jobs(b)}
        assert all(j["status"] == "done" for j in js.values())
        assert js[pending[0]]["attempts"] == 2  # the dead worker's attempt counted
    finally:
        b.stop()


def test_retries_with_backoff_then_done_or_failed(keel_factory):
    keel = keel_factory(
        **online(
            python("flaky", "flaky", kwargs={"fail_times": 2}),
            python("broken", "always_fails"),
            {
                "name": "judge",
                "evaluator": "llm_judge",
                "sample_rate": 1.0,
                "params": {"model": "gpt", "max_retries": 0},
            },
            max_attempts=3,
        )
    )
    # The judge quotes the answer, whose directive makes the judge's call fail with a 500.
    bad = base64.urlsafe_b64encode(b"[[fake: error=500]]").decode().rstrip("=")
    tid = chat(keel, f"hi [[fake: reply={bad}]]")
    wait_for(lambda: settled(keel, 3), what="all three jobs")
    js = {j["evaluator"]: j for j in jobs(keel)}
    assert js["flaky"]["status"] == "done" and js["flaky"]["attempts"] == 3
    assert js["flaky"]["last_error"] is None
    assert js["broken"]["status"] == "failed" and js["broken"]["attempts"] == 3
    assert "the evaluator is broken" in js["broken"]["last_error"]
    assert js["judge"]["status"] == "failed" and js["judge"]["attempts"] == 3
    assert "500" in js["judge"]["last_error"]
    assert [s["name"] for s in keel.rows("scores")] == ["flaky"]
    assert CALLS[f"flaky:{tid}"] == 3
    status = {e["name"]: e for e in httpx.get(f"{keel.url}/api/evals/online").json()["data"]}
    assert status["broken"]["jobs"]["failed"] == 1
    assert "broken" in status["broken"]["last_error"]["error"]
    # the backoff grows exponentially, with jitter, up to its cap
    assert all(750 <= backoff_ms(1, 1.0, 60) <= 1250 for _ in range(50))
    assert all(3000 <= backoff_ms(3, 1.0, 60) <= 5000 for _ in range(50))
    assert all(backoff_ms(30, 1.0, 60) <= 60_000 for _ in range(50))


def test_budget_cap_skips_the_rest_visibly(keel_factory):
    keel = keel_factory(**online(length("capped", max_per_day=3), length("free")))
    ids = [chat(keel, f"m{i}") for i in range(7)]
    wait_for(lambda: settled(keel, 7, "capped") and settled(keel, 7, "free"), what="jobs")
    capped = jobs(keel, "capped")
    assert sorted(j["status"] for j in capped) == ["done"] * 3 + ["skipped"] * 4
    assert all("max_per_day (3)" in j["last_error"] for j in capped if j["status"] == "skipped")
    assert len([s for s in keel.rows("scores") if s["name"] == "capped"]) == 3
    assert {j["trace_id"] for j in jobs(keel, "free")} == set(ids)
    status = {e["name"]: e for e in httpx.get(f"{keel.url}/api/evals/online").json()["data"]}
    assert status["capped"]["jobs"]["skipped"] == 4 and status["capped"]["jobs"]["done"] == 3
    assert status["capped"]["today"] == {
        "evaluations": 3,
        "max_per_day": 3,
        "spend_usd": 0.0,
        "max_cost_usd_per_day": None,
    }
    assert "max_per_day" in status["capped"]["last_error"]["error"]
    metrics = httpx.get(f"{keel.url}/metrics").text
    assert 'keel_online_eval_jobs_total{evaluator="capped",outcome="budget_skipped"} 4.0' in metrics
    runner = CliRunner()
    out = runner.invoke(cli, ["eval", "online", "--url", keel.url])
    assert out.exit_code == 0, out.output
    line = next(ln for ln in out.output.splitlines() if ln.startswith("capped"))
    assert "3/3" in line and "max_per_day" in line


def test_judge_spend_cap(keel_factory):
    judge = {"name": "judge", "evaluator": "llm_judge", "sample_rate": 1.0,
             "max_cost_usd_per_day": 1.5, "params": {"model": "gpt", "scale": "1-5"}}  # fmt: skip
    price = {"provider": "fake", "model": "fake", "per_request": 1.0}
    keel = keel_factory(prices=[price], **online(judge))
    for n in (1, 2):  # each judgment costs $1; the judge's calls are read back by feature
        chat(keel, judgment(5))
        wait_for(lambda n=n: settled(keel, n), what=f"judgment {n}")
        keel.flush()
    later = [chat(keel, judgment(5)) for _ in range(3)]
    wait_for(lambda: settled(keel, 5), what="the later jobs")
    skipped = [j for j in jobs(keel) if j["status"] == "skipped"]
    assert {j["trace_id"] for j in skipped} == set(later)
    assert all("max_cost_usd_per_day (1.5)" in j["last_error"] for j in skipped)
    (status,) = httpx.get(f"{keel.url}/api/evals/online").json()["data"]
    assert status["today"]["spend_usd"] == 2.0 and status["jobs"]["done"] == 2


def test_config_check_and_start_reject_bad_online_evaluators(fake, tmp_path):
    bad = [
        {"name": "a", "evaluator": "no_such_kind"},
        {"name": "b", "evaluator": "length", "params": {"max_chars": -1}},
        {"name": "c", "evaluator": "exact_match"},
        {"name": "d", "evaluator": "llm_judge", "params": {"model": "gpt", "bogus": 1}},
    ]
    path = tmp_path / "keel.yaml"
    path.write_text(yaml.safe_dump({"evals": {"online": bad}}))
    out = CliRunner().invoke(cli, ["config", "check", "--config", str(path)])
    assert out.exit_code == 1
    assert "4 invalid online evaluator(s)" in out.output
    for i, needle in enumerate(("unknown evaluator", "max_chars", "expected answer", "bogus")):
        line = next(ln for ln in out.output.splitlines() if f"evals.online.{i}" in ln)
        assert needle in line, line
    assert "Traceback" not in out.output
    with pytest.raises(ConfigError, match=r"evals\.online\.0"):
        create_app(make_settings(fake, tmp_path, evals={"online": bad[:1]}))
    dup = {"evals": {"online": [length("x"), length("x")]}}
    path.write_text(yaml.safe_dump(dup))
    out = CliRunner().invoke(cli, ["config", "check", "--config", str(path)])
    assert out.exit_code == 1 and "duplicate evaluator name(s) x" in out.output


# -- PostgreSQL -------------------------------------------------------------------------


@pytest.mark.postgres
def test_postgres_claims_do_not_overlap_and_scores_roll_up(pg_url, fake, tmp_path):
    engine = make_engine(pg_url)
    migrate(engine)
    now = now_ms()
    with engine.begin() as c:
        c.execute(
            sa.insert(eval_jobs),
            [
                {
                    "id": f"j{i:04d}",
                    "trace_id": f"t{i:04d}",
                    "evaluator": "e",
                    "status": "pending",
                    "attempts": 0,
                    "next_attempt_ms": now,
                    "created_at_ms": now,
                }
                for i in range(300)
            ],
        )
    got: dict[str, list[str]] = {"w1": [], "w2": []}
    barrier = threading.Barrier(2)

    def work(name: str) -> None:
        barrier.wait()
        while batch := q.claim(engine, name, 7, now_ms(), 60_000, 5):
            got[name] += [j.id for j in batch]

    threads = [threading.Thread(target=work, args=(n,)) for n in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got["w1"] and got["w2"]  # both took part
    assert not set(got["w1"]) & set(got["w2"])  # and never took the same job
    assert len(got["w1"]) + len(got["w2"]) == 300
    engine.dispose()

    keel = _server(fake, tmp_path, database_url=pg_url, **online(length("len")))
    try:
        ids = [chat(keel, f"m{i}") for i in range(5)]
        wait_for(lambda: settled(keel, 5, "len"), what="jobs on PostgreSQL")
        assert sorted(s["trace_id"] for s in keel.rows("scores", "WHERE name = 'len'")) == sorted(
            ids
        )
        roll = keel.rows("score_rollups_minute", "WHERE name = 'len'")
        assert sum(r["count"] for r in roll) == 5 and sum(r["passed"] for r in roll) == 5
    finally:
        keel.stop()
