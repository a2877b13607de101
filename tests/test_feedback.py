"""Feedback on traces (REST, SDK, CLI), agreement between judges and people, score signals
and alerts, and automatic labelling of traces into datasets. Real servers, real stores."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml
from click.testing import CliRunner
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import keel as sdk
from conftest import KeelServer, make_settings
from keel._sampling import sampled
from keel.alerts.signals import SIGNALS, EvalContext, SignalQuery
from keel.cli import cli
from keel.daemon import now_ms
from keel.data.versions import DatasetStore
from keel.errors import InvalidRequest, NotFound
from keel.evals import signals as _eval_signals  # noqa: F401  (registers the eval_* signals)
from keel.evals.scores import cohen_kappa
from test_online_evals import FAST, chat, judgment, length, settled, wait_for

ADMIN = "admin-secret-for-feedback-tests"


def post(keel: KeelServer, tid: str, key: str | None = None, **body: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{keel.url}/api/traces/{tid}/feedback", json=body, headers=headers)


def scores(keel: KeelServer) -> list[dict[str, Any]]:
    return keel.rows("scores")


# -- the REST API -------------------------------------------------------------------------


def test_feedback_api_valid_invalid_and_idempotent(keel):
    tid = chat(keel, "hi")
    r = post(keel, tid, score=4, comment="helpful", name="stars")
    assert r.status_code == 201, r.text
    s = r.json()
    assert s["trace_id"] == tid and s["value"] == 4.0 and s["comment"] == "helpful"
    assert s["source"] == "human" and s["name"] == "stars" and s["model"] == "gpt"
    r = post(keel, tid, label="wrong-tone", passed=False)
    assert r.status_code == 201 and r.json()["name"] == "user" and r.json()["passed"] is False

    # an idempotency key makes a retried post harmless
    first = post(keel, tid, score=1, idempotency_key="click-1")
    again = post(keel, tid, score=1, idempotency_key="click-1")
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    before = len(scores(keel))
    assert before == 3

    # bad input: a clear 400 (or 404), and nothing written
    cases = [
        ({}, 400, "score"),
        ({"comment": "no rating"}, 400, "score"),
        ({"score": 1, "comment": "x" * 10_001}, 400, "comment"),
        ({"score": 1, "label": ""}, 400, "label"),
        ({"score": 1, "source": "online"}, 400, "source"),
        ({"score": 1, "bogus": True}, 400, "bogus"),
        ({"score": "high"}, 400, "score"),
    ]
    for body, status, field in cases:
        r = post(keel, tid, **body)
        assert r.status_code == status, (body, r.text)
        assert field in r.json()["error"]["message"], (body, r.text)
    for raw in (b'{"score": NaN}', b'{"score": Infinity}', b"{not json"):
        r = httpx.post(
            f"{keel.url}/api/traces/{tid}/feedback",
            content=raw,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400, (raw, r.text)
    r = post(keel, "no-such-trace", score=1)
    assert r.status_code == 404 and r.json()["error"]["code"] == "trace_not_found"
    assert len(scores(keel)) == before
    # what was written is read back, oldest first, and in the trace detail
    got = httpx.get(f"{keel.url}/api/traces/{tid}/scores").json()["data"]
    assert [g["name"] for g in got] == ["stars", "user", "user"]
    detail = httpx.get(f"{keel.url}/api/traces/{tid}").json()
    assert [g["id"] for g in detail["scores"]] == [g["id"] for g in got]


def test_feedback_right_after_the_call_finds_the_trace(keel_factory):
    # A slow writer: the trace is still queued when the feedback arrives.
    keel = keel_factory(recorder={"flush_interval_s": 5})
    tid = chat(keel, "hi")
    assert post(keel, tid, score=1).status_code == 201


def test_any_key_may_post_feedback_but_not_change_config(fake, tmp_path):
    settings = make_settings(fake, tmp_path, auth={"enabled": "on"})
    keel = KeelServer(settings, {"FAKE_KEY": "sk-fake", "KEEL_ADMIN_KEY": ADMIN}).start()
    try:
        r = httpx.post(
            f"{keel.url}/api/keys",
            json={"name": "app", "role": "user"},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert r.status_code == 201, r.text
        user = r.json()["secret"]
        r = httpx.post(
            keel.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {user}"},
            json={"model": "gpt", "messages": [{"role": "user", "content": "hi"}]},
        )
        tid = r.headers["x-keel-trace-id"]
        r = post(keel, tid, user, score=1)
        assert r.status_code == 201, r.text
        assert r.json()["created_by"].startswith("app (")
        assert post(keel, tid, None, score=1).status_code == 401
        rule = {
            "name": "r",
            "signal": "eval_score_mean",
            "condition": {"op": "below", "threshold": 0.5},
        }
        headers = {"Authorization": f"Bearer {user}"}
        r = httpx.post(f"{keel.url}/api/alerts/rules", json=rule, headers=headers)
        assert r.status_code == 403
        r = httpx.get(f"{keel.url}/api/traces/{tid}/scores", headers=headers)
        assert r.status_code == 403  # reading scores needs a read key
        r = httpx.post(
            f"{keel.url}/api/alerts/rules", json=rule, headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert r.status_code == 201, r.text  # the eval signals are known to rule validation
        # the audit row is written after the response, in the background
        audit = wait_for(lambda: keel.rows("audit_log", "WHERE action LIKE '%feedback'"))
        assert audit[0]["target"] == f"trace={tid}"
    finally:
        keel.stop()


def test_sdk_feedback(keel):
    tid = chat(keel, "hi")
    keel_mod: Any = sdk
    try:
        keel_mod.init(endpoint=keel.url, exporter=InMemorySpanExporter(), set_global=False)
        s = keel_mod.feedback(tid, score=0.5, label="meh", comment="slow", idempotency_key="k")
        assert s["value"] == 0.5 and s["label"] == "meh" and s["trace_id"] == tid
        assert keel_mod.feedback(tid, score=0.5, idempotency_key="k")["id"] == s["id"]
        with pytest.raises(NotFound):
            keel_mod.feedback("nope", score=1)
        with pytest.raises(InvalidRequest, match=r"finite|comment"):
            keel_mod.feedback(tid, score=1, comment="x" * 20_000)
        with pytest.raises(ValueError, match="score and/or a label"):
            keel_mod.feedback(tid)
    finally:
        keel_mod.shutdown()
    # explicit endpoint, and Keel unreachable: logged and None, never an exception
    assert keel_mod.feedback(tid, label="ok", endpoint=keel.url)["label"] == "ok"
    assert keel_mod.feedback(tid, score=1, endpoint="http://127.0.0.1:9", timeout_s=1) is None
    assert len(scores(keel)) == 2


# -- agreement ----------------------------------------------------------------------------


def test_agreement_between_a_judge_and_people(keel_factory):
    judges = [
        {
            "name": "q5",
            "evaluator": "llm_judge",
            "sample_rate": 1.0,
            "features": ["num"],
            "params": {"model": "gpt", "scale": "1-5"},
        },
        {
            "name": "pf",
            "evaluator": "llm_judge",
            "sample_rate": 1.0,
            "features": ["cat"],
            "params": {"model": "gpt", "scale": "pass/fail"},
        },
    ]
    keel = keel_factory(evals={**FAST, "online": judges})
    # numeric: the judge gives 1..5 (0, .25, .5, .75, 1); people rate 0..1
    num = [chat(keel, judgment(s), feature="num") for s in (1, 2, 3, 4, 5)]
    human = [0.0, 0.5, 0.25, 1.0, 1.0]
    for tid, v in zip(num, human, strict=True):
        assert post(keel, tid, score=v, name="rating").status_code == 201
    # categorical: pass/fail judgments against people's pass/fail labels
    verdicts = [1, 1, 0, 0, 1, 0]
    people = ["pass", "fail", "fail", "fail", "pass", "pass"]
    cat = [chat(keel, judgment(v), feature="cat") for v in verdicts]
    for tid, lab in zip(cat, people, strict=True):
        assert post(keel, tid, label=lab, name="verdict").status_code == 201
    post(keel, chat(keel, "only people rated this"), score=1, name="rating")
    wait_for(lambda: settled(keel, 11), what="the judges")

    a = httpx.get(
        f"{keel.url}/api/evals/agreement", params={"evaluator": "q5", "human": "rating"}
    ).json()
    assert a["n"] == 5
    # By hand: x = 0, .25, .5, .75, 1; y = 0, .5, .25, 1, 1.
    # Pearson: Σdxdy = .625, Σdx² = .625, Σdy² = .8 → .625 / √(.625·.8) = .8839
    # Spearman: ranks y = 1, 3, 2, 4.5, 4.5 → 8.5 / √(10·9.5) = .8721
    assert a["numeric"]["n"] == 5
    assert a["numeric"]["pearson"] == pytest.approx(0.625 / math.sqrt(0.5), abs=1e-6)
    assert a["numeric"]["spearman"] == pytest.approx(8.5 / math.sqrt(95), abs=1e-6)
    assert a["numeric"]["mean_abs_diff"] == pytest.approx(0.15)
    worst = {d["trace_id"] for d in a["disagreements"]}
    assert worst == {num[1], num[2], num[3]}  # |diff| .25 each; the others agree
    assert all(d["difference"] == pytest.approx(0.25) for d in a["disagreements"])

    c = httpx.get(
        f"{keel.url}/api/evals/agreement", params={"evaluator": "pf", "human": "verdict"}
    ).json()["categorical"]
    # By hand: 4 of 6 agree; both raters say pass 3 of 6 → chance .5 → κ = (4/6 - .5)/.5 = 1/3
    assert c["basis"] == "label" and c["n"] == 6
    assert c["agreement"] == pytest.approx(4 / 6)
    assert c["kappa"] == pytest.approx(1 / 3)
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None  # chance agreement is already 1

    out = CliRunner().invoke(
        cli, ["eval", "agreement", "--evaluator", "q5", "--human", "rating", "--url", keel.url]
    )
    assert out.exit_code == 0, out.output
    assert "5 trace(s)" in out.output and "pearson 0.884" in out.output
    out = CliRunner().invoke(cli, ["eval", "scores", num[0], "--url", keel.url])
    assert out.exit_code == 0 and "q5" in out.output and "rating" in out.output
    out = CliRunner().invoke(
        cli,
        [
            "eval",
            "feedback",
            num[0],
            "--score",
            "1",
            "--comment",
            "fine after all",
            "--url",
            keel.url,
        ],
    )
    assert out.exit_code == 0 and "recorded user" in out.output
    out = CliRunner().invoke(cli, ["eval", "feedback", "nope", "--score", "1", "--url", keel.url])
    assert out.exit_code == 1 and out.output.startswith("error: no trace")
    out = CliRunner().invoke(cli, ["eval", "feedback", num[0], "--url", keel.url])
    assert out.exit_code == 1 and "error: give --score" in out.output


# -- signals and alerts ------------------------------------------------------------------


def test_score_signals_and_an_alert_when_scores_drop(keel_factory):
    rule = {
        "name": "quality-drop",
        "signal": "eval_score_mean",
        "window": "5m",
        "for": 0,
        "condition": {"op": "below", "threshold": 0.5},
        "filters": {"name": "user"},
    }
    keel = keel_factory(
        alerts={"evaluation_interval_s": 0.2, "rules": [rule]},
        evals={**FAST, "online": [length("len", params={"max_chars": 5})]},
    )
    ids = [chat(keel, f"m{i}") for i in range(3)]  # answers "Echo: mN" are longer than 5
    for tid in ids:
        post(keel, tid, score=1.0, passed=True)
    wait_for(lambda: settled(keel, 3), what="online scores")
    engine = keel.state.engine

    def value(name: str, **q: Any) -> dict[Any, float | None]:
        query = SignalQuery(
            300_000, now_ms() + 1, tuple(q.get("filters", {}).items()), tuple(q.get("group_by", ()))
        )
        return SIGNALS[name].values(EvalContext(engine, now_ms()), query)

    assert value("eval_score_mean", filters={"name": "user"}) == {(): 1.0}
    assert value("eval_pass_rate", filters={"name": "len"}) == {(): 0.0}
    by = value("eval_scores", group_by=("name", "source"))
    assert by == {
        (("name", "len"), ("source", "online")): 3.0,
        (("name", "user"), ("source", "human")): 3.0,
    }
    assert value("eval_queue_backlog") == {(): 0.0}
    assert value("eval_failures") == {(): 0.0}
    alerts = httpx.get(f"{keel.url}/api/alerts", params={"state": "all"}).json()["data"]
    assert not [a for a in alerts if a["state"] == "firing"]

    for tid in ids * 3:  # the people are unhappy now: mean (3 + 0) / 12 = .25
        post(keel, tid, score=0.0)
    assert value("eval_score_mean", filters={"name": "user"}) == {(): 0.25}

    def firing() -> bool:
        data = httpx.get(f"{keel.url}/api/alerts", params={"state": "all"}).json()["data"]
        return any(a["rule"] == "quality-drop" and a["state"] == "firing" for a in data)

    wait_for(firing, what="the quality-drop alert")
    names = {s["name"] for s in httpx.get(f"{keel.url}/api/alerts/signals").json()["data"]}
    assert {
        "eval_score_mean",
        "eval_pass_rate",
        "eval_scores",
        "eval_queue_backlog",
        "eval_failures",
    } <= names
    # queue signals: a pending job and a failed one
    with engine.begin() as c:
        c.execute(
            sa.text("UPDATE eval_jobs SET status = 'pending' WHERE trace_id = :t"), {"t": ids[0]}
        )
        c.execute(
            sa.text(
                "UPDATE eval_jobs SET status = 'failed', finished_at_ms = :n WHERE trace_id = :t"
            ),
            {"t": ids[1], "n": now_ms()},
        )
    assert value("eval_failures", group_by=("evaluator",)) == {(("evaluator", "len"),): 1.0}
    backlog = value("eval_queue_backlog")
    assert backlog[()] in (0.0, 1.0)  # the worker may already have taken it again


# -- automatic labelling ----------------------------------------------------------------


def test_data_from_traces_label_with(keel_factory, tmp_path):
    keel = keel_factory()
    ids = [chat(keel, judgment(v)) for v in (1, 0, 1)]
    ids.append(chat(keel, "a much longer question than the others"))
    keel.flush()
    data_dir = keel.settings.data_dir
    cfg = tmp_path / "keel.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data_dir": data_dir,
                "evals": {
                    "gateway_url": keel.url,
                    "online": [length("short", params={"max_chars": 12}, sample_rate=0.0)],
                },
            }
        )
    )
    runner = CliRunner()

    # an online evaluator of keel.yaml, by name, into a chat dataset (labels in metadata)
    out = runner.invoke(
        cli,
        [
            "data",
            "from-traces",
            "--name",
            "short-chat",
            "--label-with",
            "short",
            "--quiet",
            "--config",
            str(cfg),
        ],
    )
    assert out.exit_code == 0, out.output
    assert "labelled 4 rows with short" in out.output
    store = DatasetStore(keel.state.engine, keel.settings.artifact_root)
    v = store.get("short-chat")
    rows = list(store.read_rows(v))
    assert [r["metadata"]["trace_id"] for r in rows] == ids
    by = [r["metadata"]["labelled_by"] for r in rows]
    assert all(b["evaluator"] == "short" and b["kind"] == "length" for b in by)
    assert [b["passed"] for b in by] == [False, False, False, False]
    assert rows[0]["messages"][-1]["role"] == "assistant"  # the conversation is intact
    assert v.steps == [
        {
            "step": "label",
            "params": {
                "evaluator": "short",
                "kind": "length",
                "params": {"max_chars": 12},
                "judge_model": None,
                "prompts": [],
            },
        }
    ]
    assert v.source["labelled_by"]["evaluator"] == "short"

    # a judge by kind, into an eval dataset: the label becomes `expected`
    params = '{"model": "gpt", "scale": "pass/fail"}'
    out = runner.invoke(
        cli,
        [
            "data",
            "from-traces",
            "--name",
            "judged",
            "--kind",
            "eval",
            "--label-with",
            "llm_judge",
            "--label-params",
            params,
            "--quiet",
            "--config",
            str(cfg),
        ],
    )
    assert out.exit_code == 0, out.output
    assert "labelled 3 rows" in out.output and "left out 1 rows" in out.output
    v = store.get("judged")
    rows = list(store.read_rows(v))
    assert [r["expected"] for r in rows] == ["pass", "fail", "pass"]
    assert [r["metadata"]["trace_id"] for r in rows] == ids[:3]
    b = rows[0]["metadata"]["labelled_by"]
    assert b["judge_model"] == "gpt" and b["prompt"].startswith("keel-judge-correctness@")
    assert b["score"] == 1.0 and b["reasoning"] == "looks right"
    assert rows[0]["metadata"]["output"].startswith('{"reasoning"')
    step = v.steps[0]["params"]
    assert step["judge_model"] == "gpt" and step["prompts"] == [b["prompt"]]
    judged = keel.rows("traces", "WHERE feature = 'keel:label:llm_judge'")
    # the labeller's calls are recorded under their own feature: one per good judgment,
    # three (two corrective follow-ups) for the answer that is no judgment at all
    assert len(judged) == 3 + 3

    # sampling and a limit; bad flags are one clear line
    out = runner.invoke(
        cli,
        ["data", "from-traces", "--name", "few", "--limit", "2", "--quiet", "--config", str(cfg)],
    )
    assert out.exit_code == 0 and "2 rows" in out.output
    out = runner.invoke(
        cli,
        [
            "data",
            "from-traces",
            "--name",
            "half",
            "--kind",  # (as chat rows, they could be the very rows of "few": one version)
            "eval",
            "--sample",
            "0.5",
            "--quiet",
            "--config",
            str(cfg),
        ],
    )
    assert out.exit_code == 0, out.output
    kept = [r["metadata"]["trace_id"] for r in store.read_rows(store.get("half"))]
    assert kept == [t for t in ids if sampled(t, 0.5)]  # deterministic by trace id
    for args, msg in (
        (["--label-with", "nope"], "no online evaluator of that name"),
        (["--label-with", "exact_match"], "expected answer"),
        (["--label-with", "length", "--label-params", "{bad"], "not valid JSON"),
        (["--label-with", "length", "--label-params", '{"max_chars": -3}'], "max_chars"),
        (["--label-params", "{}"], "needs --label-with"),
    ):
        out = runner.invoke(
            cli, ["data", "from-traces", "--name", "x", "--quiet", "--config", str(cfg), *args]
        )
        assert out.exit_code == 1, (args, out.output)
        assert out.output.startswith("error: ") and msg in out.output, (args, out.output)
        assert "Traceback" not in out.output
    with pytest.raises(NotFound):
        store.get("x")  # no version was written by the failed commands
