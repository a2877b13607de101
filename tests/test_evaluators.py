"""Evaluators on crafted cases; semantic similarity and the in-process client on a real Keel."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from conftest import make_settings
from keel.app import create_app
from keel.errors import ConfigError, InvalidRequest
from keel.evals.base import EVALUATORS, EvalCase, Score, build_evaluator, validate_evaluator
from keel.evals.client import AppModelClient, GatewayError, HttpModelClient, model_client_for
from keel.evals.evaluators import PLUGIN_ERRORS, load_plugins
from keel.evals.evaluators.custom import EvaluatorError
from keel.gateway.providers.local import bundled_model_paths
from keel.testing.fake_upstream import FakeUpstream, _free_port


async def score(kind: str, params: dict[str, Any] | None = None, **case: Any) -> Score:
    ev = build_evaluator(kind, params)
    case.setdefault("input", "q")
    case.setdefault("output", "")
    return await ev.evaluate(EvalCase(**case))


# -- exact match, contains, regex --------------------------------------------------


async def test_exact_match() -> None:
    s = await score("exact_match", output=" Paris\n", expected="Paris")
    assert (s.value, s.passed) == (1.0, True)
    s = await score("exact_match", output="paris", expected="Paris")
    assert (s.value, s.passed) == (0.0, False) and s.details["expected"] == ["Paris"]
    s = await score("exact_match", {"case_sensitive": False}, output="paris", expected="Paris")
    assert s.passed is True
    s = await score("exact_match", {"strip": False}, output=" Paris", expected="Paris")
    assert s.passed is False
    s = await score(
        "exact_match", {"normalize_whitespace": True}, output="New   York\n", expected="New York"
    )
    assert s.passed is True
    s = await score("exact_match", output="NYC", expected=["New York", "NYC"])
    assert s.passed is True and s.details["matched"] == "NYC"
    s = await score("exact_match", output="42", expected=42)
    assert s.passed is True


async def test_missing_expected_and_output_are_scores_not_errors() -> None:
    for kind in ("exact_match", "similarity", "numeric"):
        s = await score(kind, output="x")
        assert s.value is None and "expected" in s.details["error"], kind
    s = await score("exact_match", output=None, expected="x")
    assert s.value is None and "no output" in s.details["error"]
    s = await score("contains", output="x")
    assert s.value is None and "values" in s.details["error"]


async def test_contains_all_any_and_case() -> None:
    s = await score("contains", {"values": ["paris", "france"]}, output="Paris is in France.")
    assert (s.value, s.passed) == (1.0, True)
    s = await score("contains", {"values": ["paris", "spain"]}, output="Paris is in France.")
    assert (s.value, s.passed) == (0.5, False) and s.details["missing"] == ["spain"]
    s = await score(
        "contains", {"values": ["paris", "spain"], "mode": "any"}, output="Paris is in France."
    )
    assert (s.value, s.passed) == (1.0, True)
    s = await score("contains", {"values": "paris", "case_sensitive": True}, output="Paris")
    assert s.passed is False
    s = await score("contains", output="the answer is 42", expected="42")
    assert s.passed is True
    s = await score("contains", {"values": ["a", "b"], "threshold": 0.5}, output="a")
    assert (s.value, s.passed) == (0.5, True)


async def test_regex_match_and_not_match() -> None:
    s = await score("regex", {"pattern": r"\d{3}-\d{4}"}, output="call 555-1234 now")
    assert s.passed is True and s.details["match"] == "555-1234"
    s = await score("regex", {"pattern": r"\d{3}-\d{4}"}, output="no number")
    assert s.passed is False and s.details["reason"] == "the pattern did not match"
    s = await score("regex", {"pattern": r"(?i)as an ai", "must_match": False}, output="Sure!")
    assert s.passed is True
    s = await score("regex", {"pattern": r"sorry", "must_match": False}, output="Sorry, no")
    assert s.passed is True  # case-sensitive by default
    s = await score(
        "regex", {"pattern": r"sorry", "must_match": False, "ignore_case": True}, output="Sorry"
    )
    assert s.passed is False and s.details["reason"] == "the pattern matched"
    s = await score("regex", {"pattern": r"\d+", "full_match": True}, output="12a")
    assert s.passed is False


# -- JSON ---------------------------------------------------------------------------


async def test_json_valid() -> None:
    assert (await score("json_valid", output='{"a": 1}')).passed is True
    assert (await score("json_valid", output="[1, 2]")).passed is True
    fenced = 'Here you go:\n```json\n{"a": [1, 2]}\n```\nAnything else?'
    assert (await score("json_valid", output=fenced)).passed is True
    assert (await score("json_valid", {"extract": False}, output=fenced)).passed is False
    s = await score("json_valid", output='{"a": 1,}')
    assert s.passed is False and "not valid JSON" in s.details["reason"]
    s = await score("json_valid", {"require_object": True}, output="[1]")
    assert s.passed is False and "not an object" in s.details["reason"]


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


async def test_json_schema() -> None:
    s = await score("json_schema", {"schema": SCHEMA}, output='{"name": "Ada", "age": 36}')
    assert (s.value, s.passed) == (1.0, True)
    s = await score("json_schema", {"schema": SCHEMA}, output='{"name": "Ada", "age": -1}')
    assert s.passed is False and s.details["errors"][0]["path"] == "age"
    s = await score("json_schema", {"schema": SCHEMA}, output='{"name": "Ada"}')
    assert s.passed is False and "'age' is a required property" in s.details["errors"][0]["message"]
    s = await score(
        "json_schema", {"schema": SCHEMA}, output='```json\n{"name": "Ada", "age": 1}\n```'
    )
    assert s.passed is True
    s = await score("json_schema", {"schema": SCHEMA}, output="not json")
    assert s.passed is False and "not valid JSON" in s.details["reason"]
    # the schema may come with the case instead
    s = await score("json_schema", output='{"name": "x", "age": 2}', expected=SCHEMA)
    assert s.passed is True
    s = await score("json_schema", output="{}", expected={"type": "nonsense"})
    assert s.value is None and "not a usable schema" in s.details["error"]


# -- closeness ------------------------------------------------------------------------


async def test_similarity() -> None:
    s = await score(
        "similarity", output="The cat sat on the mat", expected="the cat sat on the mat"
    )
    assert s.value == 1.0 and s.passed is True
    s = await score("similarity", output="The cat sat on a mat", expected="The cat sat on the mat")
    assert 0.8 < s.value < 1.0 and s.passed is True
    s = await score("similarity", output="completely different", expected="The cat sat")
    assert s.value < 0.5 and s.passed is False
    s = await score(
        "similarity",
        {"method": "token_sort"},
        output="mat the on sat cat the",
        expected="the cat sat on the mat",
    )
    assert s.value == 1.0
    s = await score("similarity", {"method": "jaccard"}, output="a b c", expected="a b d")
    assert s.value == pytest.approx(0.5)
    s = await score("similarity", {"threshold": 0.99}, output="abcd", expected=["xyz", "abce"])
    assert s.details["closest"] == "abce" and s.passed is False


async def test_numeric() -> None:
    s = await score("numeric", output="The answer is 42.", expected=42)
    assert s.passed is True and s.details["parsed"] == 42.0
    s = await score("numeric", output="It costs 1,234.50 dollars", expected="1234.5")
    assert s.passed is True
    s = await score("numeric", output="Step 1: 3+4=7. So 7 apples", expected=7)
    assert s.passed is True
    s = await score("numeric", {"pick": "first"}, output="2 then 7", expected=7)
    assert s.passed is False
    s = await score("numeric", {"pick": "only"}, output="2 then 7", expected=7)
    assert s.passed is False and "2 numbers" in s.details["reason"]
    s = await score("numeric", output="3.14", expected=3.14159)
    assert s.passed is False
    s = await score("numeric", {"abs_tol": 0.01}, output="3.14", expected=3.14159)
    assert s.passed is True
    s = await score("numeric", {"rel_tol": 0.05}, output="-104", expected=-100)
    assert s.passed is True
    s = await score("numeric", output="2e-3", expected=0.002)
    assert s.passed is True
    s = await score("numeric", output="no digits here", expected=1)
    assert s.passed is False and s.details["reason"] == "no number in the output"
    s = await score("numeric", output="1", expected="one")
    assert s.value is None and "not one number" in s.details["error"]


# -- behaviour and bounds -----------------------------------------------------------


async def test_refusal() -> None:
    refusal = "I'm sorry, but I can't help with that request."
    s = await score("refusal", output=refusal)
    assert (s.value, s.passed, s.label) == (0.0, False, "refused")
    s = await score("refusal", output="Paris is the capital of France.")
    assert (s.value, s.passed, s.label) == (1.0, True, "answered")
    s = await score("refusal", {"expect_refusal": True}, output=refusal)
    assert s.passed is True


async def test_length() -> None:
    s = await score("length", {"max_words": 3}, output="one two three")
    assert s.passed is True and s.details["words"] == 3
    s = await score("length", {"max_words": 3, "min_chars": 50}, output="one two three four")
    assert s.passed is False
    assert "4 words > max_words 3" in s.details["reason"] and "min_chars 50" in s.details["reason"]


async def test_latency_and_cost() -> None:
    assert (await score("latency", {"max_ms": 500}, latency_ms=499.0)).passed is True
    assert (await score("latency", {"max_ms": 500}, latency_ms=501.0)).passed is False
    s = await score("latency", {"max_ms": 500})
    assert s.value is None and "latency" in s.details["error"]
    assert (await score("cost", {"max_usd": 0.01}, cost_usd=0.002)).passed is True
    assert (await score("cost", {"max_usd": 0.01}, cost_usd=0.02)).passed is False
    assert (await score("cost", {"max_usd": 0.01})).value is None


# -- option errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "params", "param", "words"),
    [
        ("exact_match", {"case_sensitiv": False}, "case_sensitiv", "Extra inputs"),
        ("regex", {"pattern": "(unclosed"}, "pattern", "invalid regular expression"),
        ("regex", {}, "pattern", "Field required"),
        ("json_schema", {"schema": {"type": 12}}, "schema", "invalid JSON schema"),
        ("json_schema", {"schema": {"properties": {"a": {"minimum": "x"}}}}, "schema", "invalid"),
        ("length", {}, None, "at least one"),
        ("length", {"min_words": 5, "max_words": 2}, None, "greater than"),
        ("latency", {"max_ms": -1}, "max_ms", "greater than 0"),
        ("similarity", {"method": "soundex"}, "method", "ratio"),
        ("numeric", {"pick": "middle"}, "pick", "last"),
        ("python", {"function": "no_such_module_xyz:f"}, "function", "no_such_module_xyz"),
        ("llm_judge", {"model": "gpt", "scale": "5-1"}, "scale", "1-5"),
        ("llm_judge", {"model": "gpt", "rubric": "not a ref!"}, "rubric", "unknown rubric"),
        ("llm_judge", {"rubric": "correctness"}, "model", "Field required"),
        ("semantic_similarity", {"modle": "emb"}, "modle", "Extra inputs"),
    ],
)
def test_option_errors_name_the_field(
    kind: str, params: dict[str, Any], param: str | None, words: str
) -> None:
    with pytest.raises(InvalidRequest) as e:
        validate_evaluator(kind, params)
    assert e.value.param == param
    assert words in e.value.message and kind in e.value.message
    if param:
        assert param in e.value.message


def test_unknown_kind_and_model_evaluators_need_a_client() -> None:
    with pytest.raises(InvalidRequest) as e:
        build_evaluator("exact_matchh")
    assert (
        "unknown evaluator 'exact_matchh'" in e.value.message and "exact_match" in e.value.message
    )
    with pytest.raises(InvalidRequest) as e:
        build_evaluator("semantic_similarity", {"model": "emb"})
    assert "needs the gateway" in e.value.message
    # ... but its options validate without one (keel config check)
    cls, opts = validate_evaluator("llm_judge", {"model": "gpt", "rubric": "mine@production"})
    assert cls.kind == "llm_judge" and opts.rubric == "mine@production"  # type: ignore[attr-defined]


def test_registry_has_every_builtin_kind() -> None:
    load_plugins()
    want = {
        "exact_match", "contains", "regex", "json_valid", "json_schema", "similarity", "numeric",
        "refusal", "length", "latency", "cost", "semantic_similarity", "llm_judge", "python",
    }  # fmt: skip
    assert want <= set(EVALUATORS)
    for kind in want:
        assert EVALUATORS[kind].description, kind


# -- custom: python functions and entry points ---------------------------------------


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"user_evals_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import asyncio
            from keel.evals.base import Evaluator, EvalOptions, Score

            def polite(case, word="please"):
                return word in (case.output or "").lower()

            async def slow_len(case):
                await asyncio.sleep(0)
                return min(1.0, len(case.output or "") / 10)

            def full(case):
                return {"value": 0.25, "label": "meh", "reasoning": "because", "details": {"k": 1}}

            def as_score(case):
                return Score(value=0.5, passed=True)

            def broken(case):
                raise ValueError("boom")

            def weird(case):
                return "yes"

            def bad_dict(case):
                return {"value": 1, "colour": "red"}

            class ShoutOptions(EvalOptions):
                min_ratio: float = 0.5

            class Shout(Evaluator):
                kind = "shout_test"
                description = "Share of upper-case letters."
                Options = ShoutOptions

                async def evaluate(self, case):
                    letters = [c for c in case.output if c.isalpha()]
                    r = sum(c.isupper() for c in letters) / len(letters)
                    return self.finish(Score(value=r, passed=r >= self.options.min_ratio))

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


async def test_python_function_evaluator(user_module: str) -> None:
    m = user_module
    s = await score("python", {"function": f"{m}:polite"}, output="Please sit")
    assert (s.value, s.passed) == (1.0, True)
    s = await score(
        "python", {"function": f"{m}:polite", "kwargs": {"word": "thanks"}}, output="Please"
    )
    assert (s.value, s.passed) == (0.0, False)
    s = await score("python", {"function": f"{m}:slow_len", "threshold": 0.5}, output="abcdefgh")
    assert (s.value, s.passed) == (0.8, True)
    s = await score("python", {"function": f"{m}.full"}, output="x")
    assert (s.value, s.label, s.reasoning, s.details) == (0.25, "meh", "because", {"k": 1})
    s = await score("python", {"function": f"{m}:as_score"}, output="x")
    assert (s.value, s.passed) == (0.5, True)
    with pytest.raises(EvaluatorError, match="raised ValueError: boom"):
        await score("python", {"function": f"{m}:broken"}, output="x")
    with pytest.raises(EvaluatorError, match="returned str"):
        await score("python", {"function": f"{m}:weird"}, output="x")
    with pytest.raises(EvaluatorError, match="colour"):
        await score("python", {"function": f"{m}:bad_dict"}, output="x")
    for ref, words in [
        (f"{m}:nope", "has no attribute 'nope'"),
        (f"{m}:NOT_CALLABLE", "is not callable"),
        ("nomodule", "module.path:callable"),
    ]:
        with pytest.raises(InvalidRequest) as e:
            build_evaluator("python", {"function": ref})
        assert words in e.value.message and e.value.param == "function"


async def test_entry_point_plugins(
    user_module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real distribution on sys.path, found by importlib.metadata like an installed one.
    dist = tmp_path / "keel_test_plugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: keel-test-plugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[keel.evaluators]\n"
        f"polite_test = {user_module}:polite\n"
        f"shout = {user_module}:Shout\n"
        "broken_test = no_such_module_xyz:thing\n"
    )
    try:
        load_plugins(force=True)
        assert {"polite_test", "shout_test"} <= set(EVALUATORS)
        s = await score("polite_test", output="please do")
        assert (s.value, s.passed) == (1.0, True)
        s = await score("shout_test", {"min_ratio": 0.9}, output="HELLO world")
        assert s.value == 0.5 and s.passed is False
        with pytest.raises(InvalidRequest) as e:
            build_evaluator("shout_test", {"max_ratio": 1})
        assert "max_ratio" in e.value.message
        # a broken plugin is reported by name and breaks nothing else
        assert "no_such_module_xyz" in PLUGIN_ERRORS["broken_test"]
        with pytest.raises(InvalidRequest) as e:
            build_evaluator("broken_test")
        assert "plugin failed to load" in e.value.message
        assert (await score("exact_match", output="a", expected="a")).passed is True
    finally:
        for k in ("polite_test", "shout_test"):
            EVALUATORS.pop(k, None)
        PLUGIN_ERRORS.pop("broken_test", None)


# -- semantic similarity through a real Keel ------------------------------------------


async def test_semantic_similarity_through_keel(keel_factory: Any) -> None:
    keel = keel_factory()
    async with HttpModelClient(keel.url + "/v1") as client:
        ev = build_evaluator("semantic_similarity", {"model": "emb", "threshold": 0.99}, client)
        same = await ev.evaluate(EvalCase(input="q", output="Paris", expected="Paris"))
        assert same.value == pytest.approx(1.0) and same.passed is True
        other = await ev.evaluate(EvalCase(input="q", output="Paris", expected="Berlin"))
        assert other.value is not None and other.value < 1.0 and other.passed is False
        best = await ev.evaluate(EvalCase(input="q", output="Paris", expected=["Berlin", "Paris"]))
        assert best.value == pytest.approx(1.0) and best.details["closest"] == "Paris"
        bad = build_evaluator("semantic_similarity", {"model": "nope"}, client)
        s = await bad.evaluate(EvalCase(input="q", output="a", expected="b"))
        assert s.value is None and "does not exist" in s.details["error"]
        assert s.details["retryable"] is False
    rows = keel.rows("traces", "WHERE model = 'emb'")
    assert len(rows) == 3 and {r["feature"] for r in rows} == {"keel:eval:semantic"}


async def test_semantic_similarity_local_embed(keel_factory: Any) -> None:
    if bundled_model_paths()[1] is None:
        pytest.skip("the bundled all-MiniLM-L6-v2 is not installed (make install)")
    keel = keel_factory(local={"enabled": True, "threads": 1})
    async with HttpModelClient(keel.url) as client:
        ev = build_evaluator("semantic_similarity", {}, client)
        ref = "The cat is sleeping on the sofa."
        para = await ev.evaluate(
            EvalCase(input="q", output="A cat naps on the couch.", expected=ref)
        )
        unrelated = await ev.evaluate(
            EvalCase(input="q", output="Quarterly revenue grew by four percent.", expected=ref)
        )
    assert para.value is not None and unrelated.value is not None
    assert para.value > unrelated.value + 0.2
    assert para.details["model"] == "local-embed"


# -- clients ---------------------------------------------------------------------------


async def test_http_client_errors_and_trace_ids(keel: Any) -> None:
    async with HttpModelClient(keel.url) as client:
        res = await client.chat(
            {"model": "gpt", "messages": [{"role": "user", "content": "hello"}]}, feature="f1"
        )
        assert res.text == "Echo: hello" and res.trace_id and res.usage["completion_tokens"] == 2
        with pytest.raises(GatewayError) as e:
            await client.chat({"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        assert e.value.status == 404 and "does not exist" in e.value.message
        with pytest.raises(GatewayError) as e:
            await client.chat(
                {"model": "gpt", "messages": [{"role": "user", "content": "[[fake: error=500]]"}]}
            )
        assert e.value.status == 502 and e.value.trace_id
    rows = keel.rows("traces", f"WHERE id = '{res.trace_id}'")
    assert rows and rows[0]["feature"] == "f1"
    async with HttpModelClient(f"http://127.0.0.1:{_free_port()}", timeout_s=2) as client:
        with pytest.raises(GatewayError) as e:
            await client.embed(["x"], "emb")
        assert e.value.status == 502 and "cannot reach the gateway" in e.value.message


def test_model_client_for_picks_or_explains() -> None:
    from keel.config.quality import EvalsSettings

    with pytest.raises(ConfigError, match=r"evals\.gateway_url"):
        model_client_for(None, EvalsSettings(), {})
    c = model_client_for(None, EvalsSettings(gateway_url="http://gw:4000/v1"), {})
    assert isinstance(c, HttpModelClient) and c.base_url == "http://gw:4000"
    with pytest.raises(ConfigError, match="EVAL_KEY"):
        model_client_for(None, EvalsSettings(gateway_url="http://gw", api_key_env="EVAL_KEY"), {})


async def test_app_client_in_process_with_auth(fake: FakeUpstream, tmp_path: Path) -> None:
    settings = make_settings(fake, tmp_path, auth={"enabled": "on"})
    app = create_app(settings, environ={"FAKE_KEY": "sk-fake"})
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "keel did not start"
            await asyncio.sleep(0.01)
        body = {"model": "gpt", "messages": [{"role": "user", "content": "inside"}]}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as anon:
            r = await anon.post("/v1/chat/completions", json=body)
            assert r.status_code == 401
            r = await anon.post(
                "/v1/chat/completions", json=body, headers={"x-keel-internal": "guess"}
            )
            assert r.status_code == 401
        # The daemon's client: same process, same app, no user key.
        client = model_client_for(app, settings.evals, {})
        assert isinstance(client, AppModelClient)
        async with client:
            res = await client.chat(body, feature="keel:judge:test")
            assert res.text == "Echo: inside" and res.trace_id
            vec = await client.embed(["a", "b"], "emb")
            assert len(vec) == 2 and len(vec[0]) == 8
        state = app.state.keel
        assert state.recorder.flush(10)
        import sqlalchemy as sa

        with state.engine.connect() as c:
            row = c.execute(
                sa.text("SELECT feature, api_key_id, status FROM traces WHERE id = :i"),
                {"i": res.trace_id},
            ).one()
        assert (
            row.feature == "keel:judge:test" and row.api_key_id == "internal" and row.status == "ok"
        )
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


def test_app_client_needs_the_gateway_role(fake: FakeUpstream, tmp_path: Path) -> None:
    settings = make_settings(fake, tmp_path)
    worker = create_app(settings, environ={}, roles=("daemons",))
    with pytest.raises(ConfigError, match="gateway_url"):
        model_client_for(worker, settings.evals, {})
    with pytest.raises(ConfigError, match="gateway_url"):
        AppModelClient(worker)
    assert isinstance(
        model_client_for(worker, settings.evals.model_copy(update={"gateway_url": "http://g"}), {}),
        HttpModelClient,
    )
