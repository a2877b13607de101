"""Offline experiments: suites, runs through a real Keel and fake upstream, compare, CI gate."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
import yaml
from click.testing import CliRunner

from keel.cli import cli
from keel.data.versions import DatasetStore
from keel.evals import stats
from keel.evals.client import HttpModelClient
from keel.evals.report import compare_markdown, compare_runs, compare_text, junit_xml
from keel.evals.runner import ExperimentRunner, RunnerOptions
from keel.evals.runs import RunStore
from keel.evals.suite import SuiteError, load_suite, parse_suite
from keel.prompts.store import PromptStore

# 1 USD per prompt token, 2 per completion token: a cost is easy to check by hand.
PRICES = [
    {"provider": "fake", "model": "fake", "input_per_mtok": 1e6, "output_per_mtok": 2e6},
    {"provider": "claude", "model": "fake-claude", "input_per_mtok": 1e6, "output_per_mtok": 2e6},
]


# The `keel` console script's entry point, in a fresh interpreter.
KEEL = [sys.executable, "-c", "from keel.cli import main; main()"]


def base_suite(**over: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "name": "qa",
        "dataset": "qa@latest",
        "targets": [{"name": "gpt", "model": "gpt"}],
        "evaluators": [
            {"name": "accuracy", "kind": "exact_match"},
            {"name": "has_q", "kind": "contains", "params": {"values": "q"}},
        ],
        "thresholds": {"accuracy": 0.5},
    }
    s.update(over)
    return s


def qa_rows(n_good: int, n_bad: int, n_err: int = 0) -> list[dict[str, Any]]:
    """The fake answers "Echo: <input>": good rows expect exactly that, bad rows do not."""
    rows = []
    for i in range(n_good):
        rows.append({"input": f"q{i}", "expected": f"Echo: q{i}", "metadata": {"id": f"g{i}"}})
    for i in range(n_bad):
        rows.append({"input": f"b{i}", "expected": "something else", "metadata": {"id": f"b{i}"}})
    for i in range(n_err):
        rows.append(
            {"input": f"e{i} [[fake: error=500]]", "expected": "x", "metadata": {"id": f"e{i}"}}
        )
    return rows


def import_rows(keel: Any, rows: list[dict[str, Any]], name: str = "qa") -> str:
    ds = DatasetStore(keel.state.engine, keel.settings.artifact_root)
    return ds.write_version(name, "eval", rows).id


def run_suite(keel: Any, suite: dict[str, Any], **opts: Any) -> list[Any]:
    engine = keel.state.engine
    opts.setdefault("progress", False)

    async def go() -> list[Any]:
        async with HttpModelClient(keel.url) as client:
            runner = ExperimentRunner(
                RunStore(engine),
                DatasetStore(engine, keel.settings.artifact_root),
                PromptStore(engine),
                client,
                RunnerOptions(**opts),
            )
            return await runner.run(parse_suite(suite))

    return asyncio.run(go())


def eval_traces(keel: Any, suite: str = "qa") -> list[dict[str, Any]]:
    return keel.rows("traces", f"WHERE feature = 'eval:{suite}'")


def write_config(keel: Any, path: Path) -> str:
    cfg = path / "keel.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": keel.settings.data_dir}))
    return str(cfg)


def write_suite(path: Path, suite: dict[str, Any], name: str = "suite.yaml") -> str:
    f = path / name
    f.write_text(yaml.safe_dump(suite))
    return str(f)


# -- suite validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"evaluators": [{"name": "accuracy", "kind": "nope"}]},
            "evaluators.0.kind: unknown evaluator",
        ),
        ({"targets": [{"name": "t", "modle": "gpt"}]}, "targets.0.modle: unknown field"),
        ({"dataset": None}, "dataset:"),
        ({"thresholds": {"acc": 0.8}}, "thresholds.acc: no evaluator named 'acc'"),
        (
            {"evaluators": [{"name": "accuracy", "kind": "exact_match", "params": {"bogus": 1}}]},
            "evaluators.0.params.bogus: unknown option of 'exact_match'",
        ),
        ({"targets": [{"name": "t", "model": "gpt", "params": {"stream": True}}]}, "params"),
        ({"targets": [{"name": "t"}]}, "needs a 'model'"),
        ({"targets": []}, "targets:"),
        ({"concurrency": 0}, "concurrency:"),
        ({"extra": 1}, "extra: unknown field"),
    ],
)
def test_suite_validation_names_the_field(change: dict[str, Any], message: str) -> None:
    data = base_suite(**change)
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(SuiteError) as e:
        parse_suite(data, "s.yaml")
    assert str(e.value).startswith("s.yaml: ")
    assert message in str(e.value)


def test_suite_file_errors(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match="no such suite file"):
        load_suite(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntargets: [\n")
    with pytest.raises(SuiteError, match="not valid YAML at line"):
        load_suite(bad)
    ok = load_suite(Path(__file__).parent.parent / "examples/evals/suite.yaml")
    assert ok.metrics == ["accuracy", "short"]


# -- stats --------------------------------------------------------------------------


def test_stats_bootstrap_and_paired_test() -> None:
    rng = np.random.default_rng(3)
    x = rng.random(200)
    lo, hi = stats.bootstrap_ci(x)
    assert lo < x.mean() < hi and hi - lo < 0.2
    assert stats.bootstrap_ci(x) == (lo, hi)  # seeded: reproducible
    same = stats.paired_test(x, x)
    assert same.delta == 0 and same.p_value == 1.0 and same.ties == 200
    b = x.copy()
    b[:50] -= 0.5
    worse = stats.paired_test(x, b)
    assert worse.losses == 50 and worse.wins == 0 and worse.p_value < 0.01
    assert worse.ci_high < 0 < same.p_value
    noise = stats.paired_test(x, x + rng.normal(0, 0.01, 200))
    assert noise.p_value > worse.p_value


# -- runs through a real gateway --------------------------------------------------------


def test_run_stores_items_scores_costs_and_summary(keel_factory: Any) -> None:
    keel = keel_factory(prices=PRICES)
    import_rows(keel, qa_rows(4, 2, 1))
    suite = base_suite()
    suite["evaluators"].append({"name": "cheap", "kind": "cost", "params": {"max_usd": 10}})
    [out] = run_suite(keel, suite)
    assert out.total == 7 and not out.resumed
    store = RunStore(keel.state.engine)
    run = store.get(out.run_id)
    assert run["status"] == "completed" and run["items_done"] == 7
    items = {it["item_key"]: it for it in store.items(out.run_id)}
    assert set(items) == {"g0", "g1", "g2", "g3", "b0", "b1", "e0"}
    g0 = items["g0"]
    assert g0["output"] == "Echo: q0" and g0["error"] is None and not g0["cached"]
    assert g0["scores"]["accuracy"]["value"] == 1.0
    assert items["b0"]["scores"]["accuracy"]["value"] == 0.0
    assert g0["prompt_tokens"] == 4 and g0["completion_tokens"] == 2
    assert g0["latency_ms"] > 0
    assert g0["cost_usd"] == pytest.approx(4 + 2 * 2)  # read back from the gateway's trace
    # The cost evaluator runs once the costs are known.
    assert g0["scores"]["cheap"]["value"] == 1.0
    assert g0["scores"]["cheap"]["details"]["cost_usd"] == pytest.approx(8)
    assert g0["input"] == [{"role": "user", "content": "q0"}]
    assert "HTTP 502" in items["e0"]["error"] and items["e0"]["output"] is None
    traces = {t["id"]: t for t in eval_traces(keel)}
    assert len(traces) == 7
    assert all(it["trace_id"] in traces for it in items.values() if not it["error"])
    s = run["summary"]
    acc = s["metrics"]["accuracy"]
    assert acc["mean"] == pytest.approx(4 / 7)  # the failed call counts as 0
    assert acc["n"] == 7 and acc["errors"] == 1 and acc["pass_rate"] == pytest.approx(4 / 7)
    assert acc["ci_low"] <= acc["mean"] <= acc["ci_high"]
    assert s["errors"] == 1 and s["items"] == 7
    expected_cost = sum(it["prompt_tokens"] + 2 * it["completion_tokens"]
                        for it in items.values() if not it["error"])  # fmt: skip
    assert s["cost_usd"] == pytest.approx(expected_cost)
    assert s["tokens"]["total"] == sum(
        (it["prompt_tokens"] or 0) + (it["completion_tokens"] or 0) for it in items.values()
    )
    assert s["gates"] == [
        {"metric": "accuracy", "threshold": 0.5, "value": pytest.approx(4 / 7), "passed": True}
    ]
    assert s["latency_ms"]["p50"] > 0


def test_two_targets_make_two_runs_and_cache_avoids_calls(keel_factory: Any) -> None:
    keel = keel_factory(prices=PRICES)
    import_rows(keel, qa_rows(3, 1))
    suite = base_suite(
        targets=[{"name": "gpt", "model": "gpt"}, {"name": "claude", "model": "claude"}]
    )
    outs = run_suite(keel, suite)
    assert [o.target for o in outs] == ["gpt", "claude"]
    assert outs[0].run_id != outs[1].run_id
    store = RunStore(keel.state.engine)
    for o in outs:
        assert len(store.items(o.run_id)) == 4
        assert store.get(o.run_id)["model"] == o.target
    n_traces = len(eval_traces(keel))
    assert n_traces == 8
    # The suite again: new runs (the others are complete), every output from the cache.
    again = run_suite(keel, suite)
    assert {o.run_id for o in again}.isdisjoint({o.run_id for o in outs})
    assert len(eval_traces(keel)) == n_traces  # no new upstream call
    for o, first in zip(again, outs, strict=True):
        items = store.items(o.run_id)
        assert all(it["cached"] for it in items)
        assert o.summary["metrics"] == first.summary["metrics"]
        assert o.summary["spent_usd"] == 0.0 and o.summary["cost_usd"] > 0
        assert o.summary["cost_usd"] == first.summary["cost_usd"]
    # --no-cache calls again.
    run_suite(keel, base_suite(), use_cache=False)
    assert len(eval_traces(keel)) == n_traces + 4


def test_prompt_target_renders_rows(keel_factory: Any) -> None:
    keel = keel_factory()
    import_rows(keel, qa_rows(2, 0))
    PromptStore(keel.state.engine).push(
        {"name": "ask", "text": "Q: {{ input }} ({{ id }})", "variables": {"input": {}, "id": {}}}
    )
    [out] = run_suite(keel, base_suite(targets=[{"name": "p", "model": "gpt", "prompt": "ask@1"}]))
    items = RunStore(keel.state.engine).items(out.run_id)
    assert items[0]["input"] == [{"role": "user", "content": "Q: q0 (g0)"}]
    assert items[0]["output"] == "Echo: Q: q0 (g0)"
    assert RunStore(keel.state.engine).get(out.run_id)["prompt_ref"] == "ask@v1"


def test_resume_after_sigkill(keel_factory: Any, tmp_path: Path) -> None:
    keel = keel_factory(models={"slow": "fake/fake:delay=100"})
    import_rows(keel, qa_rows(30, 0))
    suite = write_suite(tmp_path, base_suite(name="resume", concurrency=2,
                                             targets=[{"name": "s", "model": "slow"}]))  # fmt: skip
    cmd = [*KEEL, "eval", "run", suite, "--url", keel.url,
           "--config", write_config(keel, tmp_path), "--quiet"]  # fmt: skip
    env = {**os.environ, "KEEL_API_KEY": ""}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    engine = keel.state.engine
    stored = 0
    deadline = time.monotonic() + 30
    while stored < 5 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
        with engine.connect() as c:
            stored = c.execute(sa.text("SELECT count(*) FROM eval_items")).scalar_one()
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    keel.flush()
    with engine.connect() as c:
        before = dict(c.execute(sa.text("SELECT item_key, trace_id FROM eval_items")).all())
        run_id = c.execute(sa.text("SELECT id FROM eval_runs")).scalar_one()
        assert c.execute(sa.text("SELECT status FROM eval_runs")).scalar_one() == "running"
    assert 5 <= len(before) < 30
    t_resume = int(time.time() * 1000)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"resuming run {run_id} (s): {len(before)} of 30 done" in done.stderr
    keel.flush()
    with engine.connect() as c:
        rows = c.execute(sa.text("SELECT item_key, trace_id FROM eval_items")).all()
        runs = c.execute(sa.text("SELECT id, status, items_done FROM eval_runs")).all()
    assert runs == [(run_id, "completed", 30)]
    assert len(rows) == 30 and len({k for k, _ in rows}) == 30  # each item exactly once
    assert all(dict(rows)[k] == t for k, t in before.items())  # stored items untouched
    new_calls = keel.rows(
        "traces", f"WHERE feature = 'eval:resume' AND started_at_ms >= {t_resume}"
    )
    assert len(new_calls) == 30 - len(before)  # no call repeated for a stored item


# -- compare --------------------------------------------------------------------------


def test_compare_identical_and_worse_runs(keel_factory: Any, tmp_path: Path) -> None:
    keel = keel_factory()
    import_rows(keel, qa_rows(40, 0))
    # B renders half the items differently, so the echo no longer matches them.
    PromptStore(keel.state.engine).push(
        {"name": "mangle", "variables": {"input": {}},
         "text": "{% if input[1:] | int % 2 == 0 %}{{ input }} !{% else %}{{ input }}{% endif %}"}
    )  # fmt: skip
    [a] = run_suite(keel, base_suite())
    [a2] = run_suite(keel, base_suite())  # a second, identical run (from the cache)
    [b] = run_suite(
        keel, base_suite(targets=[{"name": "gpt", "model": "gpt", "prompt": "mangle@1"}])
    )
    store = RunStore(keel.state.engine)
    same = compare_runs(store, a.run_id, a2.run_id)
    acc = same["metrics"]["accuracy"]
    assert acc["delta"] == 0 and acc["p_value"] == 1.0 and acc["ties"] == 40
    assert same["regressions"] == [] and same["paired_items"] == 40
    rep = compare_runs(store, a.run_id[:12], b.run_id, top=3)
    acc = rep["metrics"]["accuracy"]
    assert acc["mean_a"] == 1.0 and acc["mean_b"] == 0.5 and acc["delta"] == -0.5
    assert (acc["wins"], acc["losses"], acc["ties"]) == (0, 20, 20)
    assert acc["p_value"] < 0.001 and acc["ci_high"] < 0
    assert rep["metrics"]["has_q"]["delta"] == 0
    assert len(rep["regressions"]) == 3
    for g in rep["regressions"]:
        assert int(g["item_key"][1:]) % 2 == 0
        assert g["output_b"].endswith("!") and g["scores_a"]["accuracy"] == 1.0
    text = compare_text(rep)
    assert "accuracy" in text and "largest regressions" in text and "-0.500" in text
    assert "| accuracy |" in compare_markdown(rep)


# -- CLI and the CI gate ----------------------------------------------------------------


def test_cli_gate_exit_codes_junit_and_markdown(keel_factory: Any, tmp_path: Path) -> None:
    keel = keel_factory()
    import_rows(keel, qa_rows(3, 1))  # accuracy 0.75
    suite = write_suite(tmp_path, base_suite(thresholds={}))
    cfg = write_config(keel, tmp_path)
    runner = CliRunner()
    base = ["eval", "run", suite, "--url", keel.url, "--config", cfg, "--quiet"]
    junit, md = tmp_path / "out.xml", tmp_path / "summary.md"
    r = runner.invoke(cli, [*base, "--fail-under", "accuracy=0.9", "--fail-under", "has_q=0.5",
                            "--junit", str(junit), "--markdown", str(md)])  # fmt: skip
    assert r.exit_code == 1, r.output
    assert "gate failed: gpt: accuracy" in r.output
    root = ET.parse(junit).getroot()
    assert root.get("tests") == "2" and root.get("failures") == "1"
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert cases["accuracy >= 0.9"].find("failure") is not None
    assert "0.7500" in cases["accuracy >= 0.9"].find("failure").get("message")
    assert cases["has_q >= 0.5"].find("failure") is None
    text = md.read_text()
    assert "FAILED" in text and "| gpt | accuracy | 0.750 |" in text
    r = runner.invoke(cli, [*base, "--fail-under", "accuracy=0.7", "--junit", str(junit)])
    assert r.exit_code == 0, r.output
    assert ET.parse(junit).getroot().get("failures") == "0"
    r = runner.invoke(cli, [*base, "--json"])
    assert r.exit_code == 0
    [run] = json.loads(r.output)
    assert run["summary"]["metrics"]["accuracy"]["mean"] == 0.75 and run["gates"] == []
    r = runner.invoke(cli, [*base, "--fail-under", "nope=0.7"])
    assert r.exit_code == 1 and "no such metric" in r.output
    # list / show / compare / evaluators
    r = runner.invoke(cli, ["eval", "list", "--config", cfg])
    assert r.exit_code == 0 and r.output.count(" qa ") == 3
    run_ids = [line.split()[0] for line in r.output.splitlines()[1:]]
    r = runner.invoke(cli, ["eval", "show", run_ids[0][:24], "--config", cfg])
    assert r.exit_code == 0 and "accuracy" in r.output and "Echo: q0" in r.output
    r = runner.invoke(cli, ["eval", "show", run_ids[0], "--config", cfg, "--json", "--items", "2"])
    assert r.exit_code == 0 and [i["idx"] for i in json.loads(r.output)["items"]] == [0, 1]
    out_md = tmp_path / "cmp.md"
    r = runner.invoke(
        cli, ["eval", "compare", *run_ids[:2], "--config", cfg, "--markdown", str(out_md)]
    )
    assert r.exit_code == 0 and "accuracy" in r.output and out_md.exists()
    r = runner.invoke(cli, ["eval", "compare", run_ids[0], "ffffffffff", "--config", cfg])
    assert r.exit_code == 1 and r.output.startswith("error: no eval run")
    r = runner.invoke(cli, ["eval", "evaluators"])
    assert r.exit_code == 0 and "exact_match:" in r.output and "llm_judge:" in r.output


@pytest.mark.parametrize(
    ("suite", "message"),
    [
        ("name: x\nnope: [\n", "not valid YAML"),
        (yaml.safe_dump(base_suite(evaluators=[{"name": "accuracy", "kind": "zzz"}])),
         "unknown evaluator"),
        (yaml.safe_dump(base_suite(dataset="missing")), "no dataset 'missing'"),
        (yaml.safe_dump(base_suite(targets=[{"name": "t", "model": "nope"}])), "model 'nope'"),
        (yaml.safe_dump(base_suite(targets=[{"name": "t", "model": "gpt", "prompt": "np@1"}])),
         "target 't': prompt 'np' does not exist"),
    ],
)  # fmt: skip
def test_cli_bad_input_is_one_line_and_writes_nothing(
    keel_factory: Any, tmp_path: Path, suite: str, message: str
) -> None:
    keel = keel_factory()
    import_rows(keel, qa_rows(2, 0))
    f = tmp_path / "suite.yaml"
    f.write_text(suite)
    r = CliRunner().invoke(
        cli, ["eval", "run", str(f), "--url", keel.url, "--config", write_config(keel, tmp_path)]
    )
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert keel.rows("eval_runs") == [] and eval_traces(keel) == []


def test_cli_unreachable_gateway(tmp_path: Path) -> None:
    from keel.testing.fake_upstream import _free_port

    suite = write_suite(tmp_path, base_suite())
    r = CliRunner().invoke(
        cli, ["eval", "run", suite, "--url", f"http://127.0.0.1:{_free_port()}", "--quiet"]
    )
    assert r.exit_code == 1 and "cannot reach Keel at" in r.output


# -- REST -------------------------------------------------------------------------------


def test_rest_routes(keel_factory: Any) -> None:
    keel = keel_factory()
    import_rows(keel, qa_rows(3, 2))
    [a] = run_suite(keel, base_suite())
    [b] = run_suite(keel, base_suite(name="other"))
    with httpx.Client(base_url=keel.url) as h:
        runs = h.get("/api/evals/runs").json()
        assert [r["id"] for r in runs["data"]] == [b.run_id, a.run_id]
        page = h.get("/api/evals/runs", params={"limit": 1}).json()
        assert [r["id"] for r in page["data"]] == [b.run_id]
        page2 = h.get("/api/evals/runs", params={"limit": 1, "cursor": page["next_cursor"]})
        assert [r["id"] for r in page2.json()["data"]] == [a.run_id]
        only = h.get("/api/evals/runs", params={"suite": "other", "status": "completed"}).json()
        assert [r["id"] for r in only["data"]] == [b.run_id]
        run = h.get(f"/api/evals/runs/{a.run_id}").json()
        assert run["summary"]["metrics"]["accuracy"]["mean"] == pytest.approx(0.6)
        assert run["config"]["name"] == "qa"
        items = h.get(f"/api/evals/runs/{a.run_id}/items", params={"limit": 3}).json()
        assert [i["idx"] for i in items["data"]] == [0, 1, 2] and items["next_after"] == 2
        rest = h.get(f"/api/evals/runs/{a.run_id}/items", params={"after": 2}).json()
        assert [i["idx"] for i in rest["data"]] == [3, 4] and rest["next_after"] is None
        assert rest["data"][0]["scores"]["accuracy"]["value"] == 0.0
        cmp = h.get("/api/evals/compare", params={"a": a.run_id, "b": b.run_id}).json()
        assert cmp["paired_items"] == 5 and cmp["metrics"]["accuracy"]["p_value"] == 1.0
        missing = h.get("/api/evals/runs/0123456789abcdef")
        assert missing.status_code == 404 and "no eval run" in missing.json()["error"]["message"]
        assert h.get("/api/evals/compare", params={"a": a.run_id, "b": "ffff"}).status_code == 404
        assert h.get("/api/evals/runs", params={"status": "bogus"}).status_code == 400


def test_junit_without_gates_has_a_passing_case() -> None:
    run = {"id": "r1", "target": "t", "model": "gpt"}
    root = ET.fromstring(junit_xml("s", [(run, [])]))
    assert root.get("tests") == "1" and root.get("failures") == "0"


def test_runner_transport_maps_answers_and_failures(keel: Any) -> None:
    from keel.evals._transport import gateway_client
    from keel.evals.client import GatewayError
    from keel.testing.fake_upstream import _free_port

    async def go() -> None:
        async with gateway_client(keel.url, None, concurrency=4) as client:
            res = await client.chat(
                {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
            )
            assert res.text == "Echo: hi" and res.trace_id and res.usage["completion_tokens"] == 2
            bad = {"model": "gpt", "messages": [{"role": "user", "content": "[[fake: error=500]]"}]}
            with pytest.raises(GatewayError) as e:
                await client.chat(bad)
            assert e.value.status == 502 and e.value.trace_id
        async with gateway_client(f"http://127.0.0.1:{_free_port()}", None, concurrency=1) as c:
            with pytest.raises(GatewayError, match="cannot reach the gateway"):
                await c.chat({"model": "gpt", "messages": []})

    asyncio.run(go())


def test_run_and_resume_on_postgresql(keel_factory: Any, pg_url: str) -> None:
    keel = keel_factory(database_url=pg_url)
    import_rows(keel, qa_rows(3, 1) + qa_rows(1, 0))  # a repeated row: keys stay unique
    [out] = run_suite(keel, base_suite(), batch_size=2)
    store = RunStore(keel.state.engine)
    keys = [it["item_key"] for it in store.items(out.run_id)]
    assert keys == ["g0", "g1", "g2", "b0", "g0~2"]
    assert out.summary["metrics"]["accuracy"]["mean"] == pytest.approx(0.8)
    with keel.state.engine.begin() as c:  # reopen it, as if it had been interrupted
        c.execute(sa.text("UPDATE eval_runs SET status = 'running'"))
        c.execute(sa.text("DELETE FROM eval_items WHERE item_key IN ('g2', 'b0')"))
    n = len(eval_traces(keel))
    [again] = run_suite(keel, base_suite(), use_cache=False)
    assert again.run_id == out.run_id and again.resumed and again.done_before == 3
    assert len(eval_traces(keel)) == n + 2
    assert store.get(out.run_id)["items_done"] == 5
