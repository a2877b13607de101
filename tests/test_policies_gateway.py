"""Policies on the gateway path: rate limits, budgets and the response cache."""

from __future__ import annotations

import json
import time

import httpx
import pytest

PRICE = [{"provider": "fake", "model": "fake", "per_request": 0.01}]
BODY = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}


def post(keel, key=None, body=BODY, **headers):
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(keel.url + "/v1/chat/completions", json=body, headers=headers, timeout=10)


@pytest.fixture(params=["memory", "redis"])
def backend(request):
    return {} if request.param == "memory" else {"redis_url": "redis://127.0.0.1:6379/0"}


def test_key_rpm_is_enforced_with_retry_after(keel_factory, backend):
    keel = keel_factory(auth={"enabled": "on"}, **backend)
    _, secret = keel.state.keystore.create("tight", rpm=3)
    codes = [post(keel, secret).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    r = post(keel, secret)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert len(keel.rows()) == 3  # refused calls are not recorded


def test_model_rpm_applies_to_everyone(keel_factory):
    keel = keel_factory(
        models={"gpt": {"rpm": 2, "deployments": [{"provider": "fake", "model": "fake"}]}}
    )
    assert [post(keel).status_code for _ in range(3)] == [200, 200, 429]


def test_key_budget_hard_limit(keel_factory, backend):
    keel = keel_factory(auth={"enabled": "on"}, prices=PRICE, **backend)
    rec, secret = keel.state.keystore.create("ci-bot", budget_usd=0.02, budget_period="month")
    for _ in range(2):
        assert post(keel, secret).status_code == 200
        time.sleep(0.1)  # spend is settled right after each call
    r = post(keel, secret)
    assert r.status_code == 429 and r.json()["error"]["type"] == "insufficient_quota"
    assert "ci-bot" in r.json()["error"]["message"] and "$0.02" in r.json()["error"]["message"]
    assert r.headers["x-should-retry"] == "false"
    rows = keel.rows()
    assert len(rows) == 2 and all(t["cost_usd"] == pytest.approx(0.01) for t in rows)
    assert all(t["api_key_id"] == rec.id for t in rows)


def test_feature_budget_and_budget_api(keel_factory):
    keel = keel_factory(
        prices=PRICE,
        budgets=[
            {"name": "search-monthly", "scope": "feature", "match": "search", "limit_usd": 0.01},
            {"name": "everyone", "scope": "user", "match": "*", "limit_usd": 1, "mode": "soft"},
        ],
    )
    assert post(keel, **{"X-Keel-Feature": "search", "X-Keel-User": "u1"}).status_code == 200
    time.sleep(0.1)
    r = post(keel, **{"X-Keel-Feature": "search"})
    assert r.status_code == 429 and "search-monthly" in r.json()["error"]["message"]
    assert post(keel, **{"X-Keel-Feature": "chat"}).status_code == 200  # other features
    budgets = {b["name"]: b for b in httpx.get(keel.url + "/api/budgets").json()["data"]}
    assert budgets["search-monthly"]["spent_usd"] == pytest.approx(0.01)


def test_response_cache_hits_are_recorded_and_free(keel_factory, fake, backend):
    keel = keel_factory(
        prices=PRICE,
        models={"gpt": {"cache_ttl_s": 60, "deployments": [{"provider": "fake", "model": "fake"}]}},
        **backend,
    )
    body = {**BODY, "messages": [{"role": "user", "content": f"cache me {time.time()}"}]}
    first = post(keel, body=body)
    n = len(fake.requests)
    time.sleep(0.1)  # the cache write is fire-and-forget
    second = post(keel, body={**body, "user": "someone-else"})  # user does not change answers
    assert second.headers.get("x-keel-cache") == "hit"
    assert second.json()["choices"] == first.json()["choices"]
    assert len(fake.requests) == n  # the upstream was not called again
    with httpx.stream(
        "POST", keel.url + "/v1/chat/completions", json={**body, "stream": True}
    ) as r:
        assert r.headers.get("x-keel-cache") == "hit"
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == first.json()["choices"][0]["message"]["content"]
    rows = keel.rows("traces", "ORDER BY started_at_ms")
    assert [bool(t["cache_hit"]) for t in rows] == [False, True, True]
    assert rows[0]["cost_usd"] == pytest.approx(0.01) and rows[1]["cost_usd"] == 0
    assert float(json.loads(rows[1]["tags"])["_cache_saved_usd"]) == pytest.approx(0.01)


def test_redis_down_fails_open_and_says_so(keel_factory):
    keel = keel_factory(auth={"enabled": "on"}, redis_url="redis://127.0.0.1:1/0")
    _, secret = keel.state.keystore.create("k", rpm=2)
    assert [post(keel, secret).status_code for _ in range(3)] == [200, 200, 429]
    ready = httpx.get(keel.url + "/readyz").json()
    assert ready["limits"]["redis_ok"] is False and ready["limits"]["mode"] == "open"


def test_redis_down_fail_closed_refuses(keel_factory):
    keel = keel_factory(
        auth={"enabled": "on"},
        redis_url="redis://127.0.0.1:1/0",
        limits={"redis_failure": "closed"},
    )
    _, secret = keel.state.keystore.create("k", rpm=2)
    r = post(keel, secret)
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert httpx.get(keel.url + "/readyz").status_code == 503


def test_capture_modes_redact_before_storage(keel_factory):
    keel = keel_factory(
        models={
            "gpt": {"capture": "redacted", "deployments": [{"provider": "fake", "model": "fake"}]},
            "quiet": {
                "capture": "metadata-only",
                "deployments": [{"provider": "fake", "model": "fake"}],
            },
            "claude": "claude/fake-claude",
        }
    )
    pii = "mail jane.doe@example.com or call +44 20 7946 0958, card 4111 1111 1111 1111"
    for model in ("gpt", "quiet", "claude"):
        r = post(keel, body={"model": model, "messages": [{"role": "user", "content": pii}]})
        assert r.status_code == 200 and "jane.doe@example.com" in r.text  # caller sees all
    rows = {t["model"]: t for t in keel.rows()}
    red = rows["gpt"]
    assert "jane.doe@example.com" not in red["request_body"] + red["response_body"]
    assert "[REDACTED:EMAIL]" in red["request_body"]
    assert "4111" not in red["request_body"]
    assert "_redacted" in json.loads(red["tags"])
    assert rows["quiet"]["request_body"] is None and rows["quiet"]["response_body"] is None
    assert rows["quiet"]["total_tokens"] > 0  # metadata kept
    assert "jane.doe@example.com" in rows["claude"]["request_body"]  # full by default
