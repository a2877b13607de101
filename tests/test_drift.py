"""Drift: the statistical tests, feature extraction, language, settings.

The tests of the drift tests run on synthetic data with fixed seeds: each shift
must be detected and identically distributed data must stay quiet. The
run-level false-positive rate is measured over 20 seeds here (and over 100+ in
bench/drift.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from scipy import stats

from keel._sampling import sampled
from keel.config import DriftMonitorSettings, DriftSettings, load_settings
from keel.drift.features import Embedder, decode_vectors, encode_vector, extract
from keel.drift.language import detect_language
from keel.drift.monitor import DriftRunner
from keel.drift.reference import Sample, dataset_texts
from keel.drift.report import render_text
from keel.drift.tests import (
    DRIFT_TESTS,
    TestConfig,
    TestResult,
    ks_2samp,
    psi,
    tests_of_kind,
    wasserstein,
)
from keel.errors import ConfigError
from keel.tracing.bodies import answer_text, last_user_text

CFG = TestConfig(alpha=0.001)


def run(name: str, ref: Any, cur: Any, cfg: TestConfig = CFG) -> TestResult:
    return DRIFT_TESTS[name](cfg).run(ref, cur)


def test_registry_has_one_class_per_test_with_a_kind():
    assert tests_of_kind("numeric") == ["psi", "ks", "wasserstein"]
    assert tests_of_kind("categorical") == ["chi2", "js"]
    assert tests_of_kind("embedding") == ["mmd", "topic"]
    for cls in DRIFT_TESTS.values():
        assert cls.description and cls.kind in ("numeric", "categorical", "embedding")


# -- numeric -------------------------------------------------------------------------------


def test_numeric_tests_detect_a_length_shift_and_stay_quiet_on_the_same_data():
    rng = np.random.default_rng(0)
    ref = rng.poisson(40, 3000).astype(float)
    same = rng.poisson(40, 3000).astype(float)
    longer = rng.poisson(60, 3000).astype(float)
    shifted = {n: run(n, ref, longer) for n in ("psi", "ks", "wasserstein")}
    quiet = {n: run(n, ref, same) for n in ("psi", "ks", "wasserstein")}
    assert shifted["psi"].drifted and shifted["psi"].statistic > 1.0
    assert shifted["ks"].drifted and shifted["ks"].p_value < 1e-100
    assert shifted["wasserstein"].details["distance"] == pytest.approx(20, abs=1)
    assert not quiet["psi"].drifted and quiet["psi"].statistic < 0.02
    assert not quiet["ks"].drifted and quiet["ks"].p_value > 0.01
    assert quiet["wasserstein"].statistic < 0.05


def test_psi_matches_the_formula_on_a_known_case():
    ref = np.linspace(0, 1, 100_001)
    cur = np.linspace(0.5, 1.5, 100_001)
    value, edges = psi(ref, cur)
    assert edges == pytest.approx(np.linspace(0.1, 0.9, 9))
    # Five reference deciles are empty now (smoothed to 1e-4), the top one holds 60%.
    expected = 5 * (1e-4 - 0.1) * np.log(1e-4 / 0.1) + (0.6 - 0.1) * np.log(0.6 / 0.1)
    assert value == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize(
    "n,m,ties", [(5000, 7000, True), (20_000, 15_000, False), (80, 120, False)]
)
def test_ks_and_wasserstein_agree_with_scipy(n: int, m: int, ties: bool):
    rng = np.random.default_rng(n)
    a = rng.normal(size=n)
    b = rng.normal(0.05, 1.1, size=m)
    if ties:
        a, b = np.round(a * 3), np.round(b * 3)
    d, p = ks_2samp(a, b)
    ref = stats.ks_2samp(a, b, method="asymp" if n * m > 250_000 else "exact")
    assert d == pytest.approx(ref.statistic, abs=1e-12)
    assert p == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-12)
    assert wasserstein(a, b) == pytest.approx(stats.wasserstein_distance(a, b), rel=1e-9)


def test_numeric_tests_handle_constant_and_discrete_values():
    ref = np.full(500, 3.0)
    cur = np.concatenate([np.full(450, 3.0), np.full(50, 4.0)])
    r = run("psi", ref, cur)
    assert np.isfinite(r.statistic) and r.statistic > 0.2
    assert run("wasserstein", ref, ref).statistic == 0.0
    assert run("ks", ref, ref).p_value == pytest.approx(1.0)


# -- categorical --------------------------------------------------------------------------


def test_categorical_tests_detect_a_language_shift_and_stay_quiet():
    rng = np.random.default_rng(1)
    langs = ["en", "fr", "es", "unknown"]
    ref = rng.choice(langs, 2000, p=[0.9, 0.03, 0.03, 0.04]).tolist()
    same = rng.choice(langs, 2000, p=[0.9, 0.03, 0.03, 0.04]).tolist()
    moved = rng.choice(langs, 2000, p=[0.6, 0.2, 0.16, 0.04]).tolist()
    chi, js = run("chi2", ref, moved), run("js", ref, moved)
    assert chi.drifted and js.drifted and js.statistic > 0.2
    top = {c["value"]: c for c in chi.details["categories"]}
    assert top["fr"]["cur_share"] == pytest.approx(0.2, abs=0.03)
    assert not run("chi2", ref, same).drifted
    assert not run("js", ref, same).drifted


def test_chi2_pools_rare_categories_and_handles_one_category():
    r = run("chi2", ["en"] * 100 + ["xx"], ["en"] * 100 + ["yy"])
    assert r.p_value > 0.5  # one-off labels are pooled, not a shift
    one = run("chi2", ["en"] * 50, ["en"] * 50)
    assert one.statistic == 0.0 and one.p_value == 1.0 and not one.drifted
    assert run("js", ["true"] * 10, ["false"] * 10).statistic == pytest.approx(1.0)


# -- embeddings ---------------------------------------------------------------------------


def clusters(rng: np.random.Generator, n: int, p: list[float], centers: np.ndarray) -> np.ndarray:
    k = rng.choice(len(p), n, p=np.array(p) / sum(p))
    x = centers[k] + rng.normal(scale=1.0, size=(n, centers.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


CENTERS = np.random.default_rng(42).normal(size=(5, 64)).astype(np.float32)
SMALL = TestConfig(alpha=0.001, clusters=4, mmd_sample=200, permutations=200)


def test_embedding_tests_detect_a_new_topic_and_stay_quiet():
    rng = np.random.default_rng(2)
    ref = clusters(rng, 400, [1, 1, 1, 1, 0], CENTERS)
    same = clusters(rng, 400, [1, 1, 1, 1, 0], CENTERS)
    new = clusters(rng, 400, [1, 1, 1, 1, 2], CENTERS)  # a third of it is a new topic
    mmd, topic = run("mmd", ref, new, SMALL), run("topic", ref, new, SMALL)
    assert mmd.drifted and mmd.p_value < 0.001
    assert topic.drifted and topic.details["far"]["moved"]
    assert topic.details["far"]["cur_share"] > 0.25 > 0.1 > topic.details["far"]["ref_share"]
    # The assignments are kept for the report's examples.
    assert topic.arrays["cur_far"].sum() == round(topic.details["far"]["cur_share"] * 400)
    quiet_mmd, quiet_topic = run("mmd", ref, same, SMALL), run("topic", ref, same, SMALL)
    assert not quiet_mmd.drifted and quiet_mmd.p_value > 0.01
    assert quiet_mmd.details["permutations"] < 200  # stopped early: p can't get below alpha
    assert not quiet_topic.drifted


def test_topic_shares_moving_between_known_topics_is_drift():
    rng = np.random.default_rng(3)
    ref = clusters(rng, 600, [1, 1, 1, 1, 0], CENTERS)
    cur = clusters(rng, 600, [4, 1, 1, 0.2, 0], CENTERS)
    topic = run("topic", ref, cur, SMALL)
    assert topic.drifted and topic.details["shares_moved"] and not topic.details["far"]["moved"]
    grown = [c for c in topic.details["clusters"] if c["grown"]]
    assert len(grown) == 1 and grown[0]["cur_share"] > 0.45


# -- a whole run: false positives and power -------------------------------------------------


def sample(rng: np.random.Generator, n: int, *, longer: float = 1.0, new_topic: float = 0.0):
    emb = clusters(rng, n, [1, 1, 1, 1, new_topic * 4 / (1 - new_topic)], CENTERS)
    tokens = rng.poisson(30 * longer, n).astype(float)
    return Sample(
        n=n,
        numeric={
            "input_tokens": tokens,
            "output_tokens": tokens + 2,
            "latency_ms": rng.lognormal(6, 0.4, n),
            "retrieval_top_score": rng.uniform(0.2, 0.9, n),
            "retrieval_count": rng.integers(0, 6, n).astype(float),
        },
        categorical={
            "language": rng.choice(["en", "fr", "unknown"], n, p=[0.9, 0.05, 0.05]).tolist(),
            "refusal": rng.choice(["false", "true"], n, p=[0.97, 0.03]).tolist(),
            "model": rng.choice(["a", "b"], n, p=[0.7, 0.3]).tolist(),
        },
        embeddings={"input_embedding": emb, "output_embedding": emb},
        texts={"input_embedding": [f"q{i}" for i in range(n)], "output_embedding": [""] * n},
    )


def test_run_level_false_positive_rate_over_20_seeds_and_power():
    s = DriftSettings(mmd_sample=150, permutations=200, cluster_sample=400)
    runner = DriftRunner(None, s, Embedder(enabled=False))  # type: ignore[arg-type]
    m = DriftMonitorSettings(name="m")
    false_alarms = 0
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        rep = runner.compare(m, sample(rng, 120), sample(rng, 120), seed)
        assert rep["tests"] == 14  # 5 numeric + 3 categorical + 2 x 3 embedding decisions
        false_alarms += rep["drifted"]
    # The design rate is <= alpha = 1% (Bonferroni). Were it even the 5% target, 5 or
    # more false alarms in 20 runs would have probability 0.26% (binomial tail); the
    # seeds are fixed, so this either always passes or always fails.
    assert false_alarms <= 4
    for seed in range(5):
        rng = np.random.default_rng(200 + seed)
        ref = sample(rng, 120)
        longer = runner.compare(m, ref, sample(rng, 120, longer=1.5), seed)
        assert longer["drifted_features"][:2] == ["input_tokens", "output_tokens"]
        topic = runner.compare(m, ref, sample(rng, 120, new_topic=0.3), seed)
        assert "input_embedding" in topic["drifted_features"]
        assert "language" not in topic["drifted_features"]


def test_a_run_report_sorts_features_by_severity_and_reads_well():
    s = DriftSettings(mmd_sample=200, permutations=200, cluster_sample=400)
    runner = DriftRunner(None, s, Embedder(enabled=False))  # type: ignore[arg-type]
    rng = np.random.default_rng(7)
    rep = runner.compare(
        DriftMonitorSettings(name="m"), sample(rng, 200), sample(rng, 200, longer=2.0)
    )
    assert rep["drifted_features"][:2] == ["input_tokens", "output_tokens"]
    first = rep["features"][0]
    assert first["summary"]["cur"]["p50"] > 1.8 * first["summary"]["ref"]["p50"]
    run_row = {
        "id": "r1",
        "monitor": "m",
        "computed_at_ms": 0,
        "window_start_ms": 0,
        "window_end_ms": 3_600_000,
        "reference": {"kind": "last_week", "start_ms": 0, "end_ms": 1},
        "n_current": 200,
        "n_reference": 200,
        "report": orjson.loads(orjson.dumps(rep, option=orjson.OPT_SERIALIZE_NUMPY)),
    }
    text = render_text(run_row)
    assert "DRIFTED: input_tokens, output_tokens" in text
    assert text.index("input_tokens") < text.index("language")


def test_the_report_shows_grown_topics_with_examples():
    s = DriftSettings(mmd_sample=200, permutations=200, cluster_sample=400, clusters=4)
    runner = DriftRunner(None, s, Embedder(enabled=False))  # type: ignore[arg-type]
    rng = np.random.default_rng(8)

    def side(p: list[float]) -> Sample:
        k = rng.choice(4, 300, p=np.array(p) / sum(p))
        x = CENTERS[k] + rng.normal(scale=0.4, size=(300, CENTERS.shape[1]))  # clean topics
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        texts = [f"question about topic {i}" for i in k]
        return Sample(n=300, embeddings={"input_embedding": x}, texts={"input_embedding": texts})

    m = DriftMonitorSettings(name="m", columns=["input_embedding"])
    rep = runner.compare(m, side([1, 1, 1, 1]), side([5, 1, 1, 1]))
    [feature] = rep["features"]
    grown = [c for c in feature["topics"]["clusters"] if c.get("examples")]
    assert feature["drifted"] and len(grown) == 1
    assert set(grown[0]["examples"]) == {"question about topic 0"} == set(grown[0]["about"])
    run_row = {
        "id": "r1",
        "monitor": "m",
        "computed_at_ms": 0,
        "window_start_ms": 0,
        "window_end_ms": 1,
        "reference": {"kind": "period"},
        "n_current": 300,
        "n_reference": 300,
        "report": orjson.loads(orjson.dumps(rep, option=orjson.OPT_SERIALIZE_NUMPY)),
    }
    text = render_text(run_row)
    assert f"topic {grown[0]['cluster']} (like: 'question about topic 0') grew from 2" in text
    assert "- question about topic 0" in text


# -- features ------------------------------------------------------------------------------


def trace(**over: Any) -> dict[str, Any]:
    req = {
        "model": "gpt",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": [{"type": "text", "text": "Where is my parcel today?"}]},
        ],
    }
    resp = {"choices": [{"message": {"role": "assistant", "content": "I'm sorry, I can't help."}}]}
    t = {
        "id": "t1",
        "started_at_ms": 1000,
        "model": "gpt",
        "feature": "support",
        "prompt_tokens": 20,
        "completion_tokens": 7,
        "duration_ms": 321.0,
        "request_body": orjson.dumps(req).decode(),
        "response_body": orjson.dumps(resp).decode(),
    }
    return {**t, **over}


def test_extract_reads_the_last_user_message_and_the_answer():
    row, inp, out = extract(trace(), (0.83, 5), example_chars=10)
    assert inp == "Where is my parcel today?" and out == "I'm sorry, I can't help."
    assert row["input_tokens"] == 20 and row["output_tokens"] == 7 and row["latency_ms"] == 321.0
    assert row["refusal"] is True and row["language"] == "en"
    assert row["retrieval_top_score"] == 0.83 and row["retrieval_count"] == 5
    assert row["input_text"] == "Where is m" and row["feature"] == "support"


def test_extract_keeps_the_numbers_of_traces_without_usable_bodies():
    for over in (
        {"request_body": None, "response_body": None},  # capture off
        {"request_body": "{not json", "response_body": "]"},
        {"request_body": orjson.dumps({"_keel_truncated": True, "head": "{"}).decode()},
    ):
        row, inp, _ = extract(trace(**over))
        assert inp is None and row["language"] is None and row["input_text"] is None
        assert row["input_tokens"] == 20 and row["latency_ms"] == 321.0
    stream = orjson.dumps({"message": {"role": "assistant", "content": "Sure, here."}}).decode()
    row, _, out = extract(trace(response_body=stream))
    assert out == "Sure, here." and row["refusal"] is False
    assert answer_text({"_keel_truncated": True}) is None
    assert last_user_text([{"role": "assistant", "content": "x"}]) is None


def test_language_detection():
    assert detect_language("Where is my parcel? It should have arrived yesterday.") == "en"
    assert detect_language("Pourquoi ai-je été débité deux fois ce mois-ci ?") == "fr"
    assert detect_language("¿Dónde está mi pedido? Debía llegar ayer.") == "es"
    assert detect_language("ok thanks") == "unknown"
    assert detect_language("") == "unknown" and detect_language(None) == "unknown"


def test_vectors_round_trip_as_float16_base64():
    v = np.random.default_rng(0).normal(size=(3, 384)).astype(np.float32)
    back = decode_vectors([encode_vector(x) for x in v])
    assert back.shape == (3, 384) and back.dtype == np.float32
    assert np.abs(back - v).max() < 4e-3
    assert len(encode_vector(v[0])) == 1024


def test_sampling_is_deterministic_by_trace_id():
    ids = [f"{i:032x}" for i in range(4000)]
    picked = [i for i in ids if sampled(i, 0.25)]
    assert picked == [i for i in ids if sampled(i, 0.25)]
    assert 0.22 < len(picked) / len(ids) < 0.28
    assert all(sampled(i, 1.0) for i in ids[:10]) and not any(sampled(i, 0.0) for i in ids[:10])


def test_dataset_rows_give_input_and_output_texts():
    chat = {
        "messages": [
            {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "hello"},
        ]
    }
    assert dataset_texts(chat) == ("hi there", "hello")
    assert dataset_texts({"prompt": "p", "completion": "c"}) == ("p", "c")
    assert dataset_texts({"input": "q", "expected": "a"}) == ("q", "a")
    msgs = {"messages": [{"role": "user", "content": "q2"}]}
    assert dataset_texts({"input": msgs, "expected": None}) == ("q2", None)
    assert dataset_texts({"input": {"x": 1}, "expected": 3}) == ('{"x":1}', None)


def test_embedder_off_or_missing_says_why():
    off = Embedder(enabled=False)
    assert off.embed(["a"]) is None and "drift.embeddings" in (off.reason or "")
    gone = Embedder("/nonexistent/model")
    assert gone.embed(["a"]) is None and "/nonexistent/model" in (gone.reason or "")


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "monitor,message",
    [
        (
            {"name": "a", "reference": {"kind": "dataset"}},
            "drift.monitors.0.reference: kind 'dataset' needs",
        ),
        (
            {
                "name": "a",
                "reference": {"kind": "period", "start": "2026-01-02", "end": "2026-01-01"},
            },
            "drift.monitors.0.reference: `start` (2026-01-02) must be before",
        ),
        (
            {"name": "a", "reference": {"kind": "period", "start": "soon"}},
            "needs both `start` and `end`",
        ),
        (
            {"name": "a", "columns": ["input_tokens", "vibes"]},
            "drift.monitors.0: columns: unknown drift feature(s) 'vibes'",
        ),
        (
            {"name": "a", "reference": {"kind": "last_week", "dataset": "d"}},
            "`dataset` is only used",
        ),
    ],
)
def test_bad_monitor_config_names_the_entry(tmp_path: Path, monitor: dict, message: str):
    cfg = tmp_path / "keel.yaml"
    cfg.write_text(orjson.dumps({"drift": {"monitors": [monitor]}}).decode())  # JSON is YAML
    with pytest.raises(ConfigError) as e:
        load_settings(cfg, environ={})
    assert message in str(e.value)


def test_duplicate_monitor_names_are_refused():
    with pytest.raises(ValueError, match="duplicate name"):
        DriftSettings.model_validate({"monitors": [{"name": "a"}, {"name": "a"}]})
