"""The LLM judge against a real Keel and the fake upstream replying with crafted judgments."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from keel.errors import InvalidRequest, NotFound
from keel.evals.base import EvalCase, build_evaluator
from keel.evals.client import HttpModelClient
from keel.prompts.store import PromptStore
from keel.testing.fake_upstream import FakeUpstream


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def replies(*texts: str | dict[str, Any]) -> str:
    """A directive making the fake answer the judge with these texts, one per attempt."""
    enc = [_b64(t if isinstance(t, str) else orjson.dumps(t).decode()) for t in texts]
    return f"[[fake: reply={'.'.join(enc)}]]"


def case(directive: str, **kw: Any) -> EvalCase:
    return EvalCase(
        input=[{"role": "user", "content": "What is the capital of France?"}],
        output=f"Paris. {directive}",
        expected=kw.pop("expected", "Paris"),
        **kw,
    )


@pytest.fixture
async def env(keel_factory: Any) -> AsyncIterator[tuple[Any, HttpModelClient, PromptStore]]:
    keel = keel_factory()
    async with HttpModelClient(keel.url) as client:
        yield keel, client, PromptStore(keel.state.engine)


def judge(client: HttpModelClient, store: PromptStore | None, **params: Any) -> Any:
    ctx = {"prompt_store": store} if store is not None else None
    return build_evaluator("llm_judge", {"model": "gpt", **params}, client, context=ctx)


def _judge_request(fake: FakeUpstream, marker: str) -> list[dict[str, Any]]:
    return [
        r
        for r in fake.requests
        if any(marker in str(m.get("content")) for m in r.get("messages") or [])
    ]


async def test_good_judgment(env: Any, fake: FakeUpstream) -> None:
    keel, client, store = env
    directive = replies({"reasoning": "Paris is right.", "score": 5})
    s = await judge(client, store).evaluate(case(directive))
    assert s.value == 1.0 and s.reasoning == "Paris is right."
    d = s.details
    assert d["attempts"] == 1 and d["judge_model"] == "gpt" and d["judgment"] == 5
    assert d["prompt"] == "keel-judge-correctness@v1" and d["prompt_version_id"]
    assert orjson.loads(d["raw"]) == {"reasoning": "Paris is right.", "score": 5}
    assert d["usage"]["prompt_tokens"] > 0 and len(d["trace_ids"]) == 1
    # the rubric is a stored prompt version, and what judged is recorded
    pv = store.get("keel-judge-correctness@1")
    assert pv.id == d["prompt_version_id"] and pv.spec.messages is not None
    # the request: rendered rubric, temperature 0 (over the alias' 0.1), JSON mode
    (req,) = _judge_request(fake, directive)
    assert req["temperature"] == 0 and req["response_format"] == {"type": "json_object"}
    assert "CORRECTNESS" in req["messages"][0]["content"]
    assert "What is the capital of France?" in req["messages"][1]["content"]
    assert "[Reference answer]\nParis" in req["messages"][1]["content"]
    # the judge's call is a recorded trace of its own feature
    (row,) = keel.rows("traces", f"WHERE id = '{d['trace_ids'][0]}'")
    assert row["feature"] == "keel:judge" and row["model"] == "gpt"


async def test_bad_judgment_and_scales(env: Any) -> None:
    _, client, store = env
    s = await judge(client, store).evaluate(case(replies({"reasoning": "Wrong.", "score": 1})))
    assert s.value == 0.0 and s.reasoning == "Wrong." and s.passed is None
    s = await judge(client, store, threshold=0.5).evaluate(
        case(replies({"reasoning": "Meh.", "score": 3}))
    )
    assert s.value == 0.5 and s.passed is True
    s = await judge(client, store, scale="1-10").evaluate(
        case(replies({"reasoning": "ok", "score": 7}))
    )
    assert s.value == pytest.approx(6 / 9)
    s = await judge(client, store, scale="pass/fail", rubric="helpfulness").evaluate(
        case(replies({"reasoning": "helps", "score": "pass"}))
    )
    assert (s.value, s.label, s.passed) == (1.0, "pass", True)
    assert s.details["prompt"] == "keel-judge-helpfulness@v1"
    s = await judge(client, store, scale="pass/fail").evaluate(
        case(replies({"reasoning": "no", "score": 0}))
    )
    assert (s.value, s.label, s.passed) == (0.0, "fail", False)


async def test_code_fences_are_tolerated(env: Any) -> None:
    _, client, store = env
    raw = 'Sure!\n```json\n{"reasoning": "fine", "score": 4}\n```'
    s = await judge(client, store).evaluate(case(replies(raw)))
    assert s.value == 0.75 and s.details["attempts"] == 1


async def test_malformed_then_good_retries(env: Any, fake: FakeUpstream) -> None:
    _, client, store = env
    directive = replies("I think it is a 5.", {"reasoning": "Correct.", "score": 5})
    s = await judge(client, store).evaluate(case(directive))
    assert s.value == 1.0 and s.details["attempts"] == 2 and s.reasoning == "Correct."
    assert len(s.details["trace_ids"]) == 2
    first, second = _judge_request(fake, directive)
    assert second["messages"][:-2] == first["messages"]
    assert second["messages"][-2] == {"role": "assistant", "content": "I think it is a 5."}
    assert "could not be used" in second["messages"][-1]["content"]
    assert "not valid JSON" in second["messages"][-1]["content"]


async def test_always_malformed_gives_up(env: Any, fake: FakeUpstream) -> None:
    _, client, store = env
    directive = replies("no idea")
    s = await judge(client, store).evaluate(case(directive))
    assert s.value is None and s.details["attempts"] == 3
    assert s.details["error"].startswith("malformed judgment after 3 attempt(s)")
    assert s.details["raw"] == "no idea" and s.details["retryable"] is False
    assert len(_judge_request(fake, directive)) == 3
    s = await judge(client, store, max_retries=0).evaluate(case(replies({"score": 3})))
    assert s.value is None and s.details["attempts"] == 1
    assert "reasoning" in s.details["error"]


async def test_score_out_of_range_is_malformed(env: Any) -> None:
    _, client, store = env
    s = await judge(client, store, max_retries=1).evaluate(
        case(replies({"reasoning": "great", "score": 7}))
    )
    assert s.value is None and s.details["attempts"] == 2
    assert "score" in s.details["error"] and "5" in s.details["error"]
    s = await judge(client, store).evaluate(
        case(replies({"reasoning": "x", "score": 9}, {"reasoning": "ok now", "score": 2}))
    )
    assert s.value == 0.25 and s.details["attempts"] == 2


async def test_upstream_error_is_a_clear_score(env: Any) -> None:
    _, client, store = env
    s = await judge(client, store).evaluate(case("[[fake: error=500]]"))
    assert s.value is None and s.details["retryable"] is True and s.details["attempts"] == 1
    assert "judge call failed" in s.details["error"] and "502" in s.details["error"]
    assert s.details["trace_ids"]  # the failed call was recorded by the gateway
    s = await judge(client, store).evaluate(case("[[fake: error=400]]"))
    assert s.value is None and s.details["retryable"] is False
    s = await build_evaluator("llm_judge", {"model": "nope"}, client).evaluate(case(""))
    assert s.value is None and "does not exist" in s.details["error"]


async def test_stored_rubric_by_label(env: Any) -> None:
    _, client, store = env
    spec = {
        "name": "tone",
        "messages": [
            {"role": "system", "content": "Rate politeness {{ scale_min }}-{{ scale_max }}."},
            {"role": "user", "content": "{{ output }}"},
        ],
        "variables": {
            "output": {"type": "string"},
            "scale_min": {"type": "integer"},
            "scale_max": {"type": "integer"},
        },
        "params": {"max_tokens": 50},
    }
    pv, _ = store.push(spec)
    store.set_label("tone", "production", pv.version)
    s = await judge(client, store, rubric="tone:production").evaluate(
        case(replies({"reasoning": "polite", "score": 4}))
    )
    assert s.value == 0.75 and s.details["prompt"] == "tone@v1"
    assert s.details["prompt_version_id"] == pv.id
    with pytest.raises(NotFound, match="no version 9"):
        await judge(client, store, rubric="tone@9").evaluate(case(replies("x")))
    with pytest.raises(InvalidRequest, match="prompt store"):
        await judge(client, None, rubric="tone@1").evaluate(case(replies("x")))


async def test_builtin_rubric_is_pushed_once(env: Any) -> None:
    _, client, store = env
    good = replies({"reasoning": "ok", "score": 5})
    for _ in range(2):
        s = await judge(client, store, rubric="toxicity").evaluate(case(good))
        assert s.details["prompt"] == "keel-judge-toxicity@v1"
    assert len(store.versions("keel-judge-toxicity")) == 1
    # without a store the built-in text is used as is, and named by its content hash
    s = await judge(client, None, rubric="faithfulness").evaluate(case(good))
    assert s.value == 1.0 and s.details["prompt"].startswith("keel-judge-faithfulness@builtin-")
    assert s.details["prompt_version_id"] is None


async def test_no_output_is_not_judged(env: Any, fake: FakeUpstream) -> None:
    _, client, store = env
    n = len(fake.requests)
    s = await judge(client, store).evaluate(EvalCase(input="q", output=None))
    assert s.value is None and "no output" in s.details["error"] and len(fake.requests) == n
