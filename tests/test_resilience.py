"""Retries, fallbacks, deployment timeouts, circuit breakers and load-balancing strategies."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest


def alias(*models: str, **over):
    return {"deployments": [{"provider": "fake", "model": m} for m in models], **over}


def chat(keel, model, content="hi", **kw):
    return httpx.post(
        keel.url + "/v1/chat/completions",
        timeout=15,
        json={"model": model, "messages": [{"role": "user", "content": content}], **kw},
    )


def sent_models(fake, since):
    return [r["model"] for r in fake.requests[since:]]


def test_fallback_to_the_next_deployment(keel_factory, fake):
    keel = keel_factory(
        models={
            "ha": alias(
                "fake:error=503", "fake:tag=b", strategy="fallback", retries=1, retry_backoff_s=0.01
            )
        }
    )
    n = len(fake.requests)
    r = chat(keel, "ha")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Echo: hi"
    assert sent_models(fake, n) == ["fake:error=503", "fake:tag=b"]
    (t,) = keel.rows()
    assert t["status"] == "ok" and t["upstream_model"] == "fake:tag=b"
    tags = json.loads(t["tags"])
    assert tags["_attempts"] == "2" and tags["_tried"] == "fake/fake:error=503,fake/fake:tag=b"


def test_client_errors_are_not_retried(keel_factory, fake):
    keel = keel_factory(
        models={"ha": alias("fake:error=400", "fake", strategy="fallback", retries=3)}
    )
    n = len(fake.requests)
    r = chat(keel, "ha")
    assert r.status_code == 400 and len(fake.requests) - n == 1


def test_all_tries_fail_says_what_was_tried(keel_factory, fake):
    keel = keel_factory(
        models={
            "ha": alias(
                "fake:error=500",
                "fake:error=502",
                strategy="fallback",
                retries=2,
                retry_backoff_s=0.01,
            )
        }
    )
    n = len(fake.requests)
    r = chat(keel, "ha")
    assert r.status_code == 502
    msg = r.json()["error"]["message"]
    assert "tried 3 times" in msg and "fake/fake:error=502" in msg
    assert sent_models(fake, n) == ["fake:error=500", "fake:error=502", "fake:error=500"]
    (t,) = keel.rows()
    assert t["status"] == "error" and "tried 3 times" in t["error_message"]


def test_deployment_timeout_moves_on(keel_factory, fake):
    keel = keel_factory(
        models={
            "ha": {
                "strategy": "fallback",
                "retries": 1,
                "retry_backoff_s": 0.01,
                "deployments": [
                    {"provider": "fake", "model": "fake:delay=2000", "timeout_s": 0.2},
                    {"provider": "fake", "model": "fake"},
                ],
            }
        }
    )
    t0 = time.perf_counter()
    r = chat(keel, "ha")
    # the slow deployment answers after 2 s: anything under that means it was cut off
    assert r.status_code == 200 and time.perf_counter() - t0 < 1.9
    (t,) = keel.rows()
    assert t["upstream_model"] == "fake" and json.loads(t["tags"])["_attempts"] == "2"


def test_streams_fail_over_before_the_first_chunk(keel_factory, fake):
    keel = keel_factory(
        models={
            "ha": alias(
                "fake:error=503", "fake", strategy="fallback", retries=1, retry_backoff_s=0.01
            )
        }
    )
    with httpx.stream(
        "POST",
        keel.url + "/v1/chat/completions",
        json={"model": "ha", "stream": True, "messages": [{"role": "user", "content": "a b"}]},
    ) as r:
        assert r.status_code == 200
        text = "".join(
            json.loads(ln[6:])["choices"][0]["delta"].get("content") or ""
            for ln in r.iter_lines()
            if ln.startswith("data: {") and json.loads(ln[6:])["choices"]
        )
    assert text == "Echo: a b"
    (t,) = keel.rows()
    assert t["stream"] and t["upstream_model"] == "fake" and t["status"] == "ok"


def test_circuit_breaker_opens_and_half_opens(keel_factory, fake):
    keel = keel_factory(
        models={
            "ha": {
                "strategy": "fallback",
                "retries": 1,
                "retry_backoff_s": 0.0,
                "circuit_breaker": {"failures": 2, "cooldown_s": 0.6},
                "deployments": [
                    {"provider": "fake", "model": "fake:error=503"},
                    {"provider": "fake", "model": "fake"},
                ],
            }
        }
    )
    n = len(fake.requests)
    for _ in range(2):
        assert chat(keel, "ha").status_code == 200
    # two failures opened the breaker: the failing deployment is skipped now
    m = len(fake.requests)
    for _ in range(3):
        assert chat(keel, "ha").status_code == 200
    assert sent_models(fake, m) == ["fake"] * 3
    assert sent_models(fake, n)[:4] == ["fake:error=503", "fake", "fake:error=503", "fake"]
    time.sleep(0.7)  # cool-down over: one call probes the failing deployment again
    m = len(fake.requests)
    assert chat(keel, "ha").status_code == 200
    assert sent_models(fake, m) == ["fake:error=503", "fake"]


def test_weighted_split(keel_factory, fake):
    keel = keel_factory(
        models={
            "ab": {
                "retries": 0,
                "deployments": [
                    {"provider": "fake", "model": "fake:a", "weight": 9},
                    {"provider": "fake", "model": "fake:b", "weight": 1},
                ],
            }
        }
    )
    n = len(fake.requests)
    for _ in range(200):
        assert chat(keel, "ab").status_code == 200
    share = sent_models(fake, n).count("fake:a") / 200
    assert 0.8 <= share <= 0.97, share


def test_least_busy_spreads_concurrent_calls(keel_factory, fake):
    keel = keel_factory(
        models={
            "lb": {
                "strategy": "least-busy",
                "retries": 0,
                "deployments": [
                    {"provider": "fake", "model": "fake:delay=300,x=1"},
                    {"provider": "fake", "model": "fake:delay=300,x=2"},
                ],
            }
        }
    )
    n = len(fake.requests)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: chat(keel, "lb").status_code, range(8)))
    assert codes == [200] * 8
    got = sent_models(fake, n)
    assert got.count("fake:delay=300,x=1") == got.count("fake:delay=300,x=2") == 4


@pytest.mark.parametrize("strategy", ["weighted", "least-busy", "fallback"])
def test_strategies_validate(strategy, keel_factory):
    keel = keel_factory(models={"x": alias("fake", strategy=strategy)})
    assert chat(keel, "x").status_code == 200
