"""The gateway end to end: the official openai SDK → Keel (real uvicorn) → fake upstream."""

from __future__ import annotations

import json

import httpx
import openai
import pytest


def test_chat_non_streaming_is_recorded(keel, fake):
    client = openai.OpenAI(base_url=keel.url + "/v1", api_key="unused")
    raw = client.chat.completions.with_raw_response.create(
        model="gpt",
        messages=[{"role": "user", "content": "hello there world"}],
        user="alice",
        extra_headers={"X-Keel-Feature": "search", "X-Keel-Tags": "team=core,env=test"},
    )
    resp = raw.parse()
    assert resp.choices[0].message.content == "Echo: hello there world"
    trace_id = raw.headers["x-keel-trace-id"]
    # the alias' default params were merged and the upstream model substituted
    sent = fake.requests[-1]
    assert sent["model"] == "fake" and sent["temperature"] == 0.1
    assert fake.headers[-1]["authorization"] == "Bearer sk-fake"

    rows = keel.rows("traces", f"WHERE id = '{trace_id}'")
    assert len(rows) == 1
    t = rows[0]
    assert t["model"] == "gpt" and t["provider"] == "fake" and t["upstream_model"] == "fake"
    assert t["status"] == "ok" and t["http_status"] == 200
    assert t["prompt_tokens"] == resp.usage.prompt_tokens
    assert t["completion_tokens"] == resp.usage.completion_tokens == 4
    assert not t["tokens_estimated"]
    assert t["user_id"] == "alice" and t["feature"] == "search"
    assert json.loads(t["tags"]) == {"team": "core", "env": "test"}
    assert json.loads(t["request_body"])["messages"][0]["content"] == "hello there world"
    assert json.loads(t["response_body"])["choices"][0]["message"]["content"].startswith("Echo")
    assert t["duration_ms"] > 0 and t["ttft_ms"] is None


def test_chat_streaming_relays_chunks_and_records_usage(keel, fake):
    client = openai.OpenAI(base_url=keel.url + "/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="gpt", messages=[{"role": "user", "content": "one two three"}], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: one two three"
    # Keel asked the upstream for usage, but the client did not: no usage chunk reaches it.
    assert fake.requests[-1]["stream_options"] == {"include_usage": True}
    assert all(c.choices for c in chunks)
    (t,) = keel.rows("traces", "WHERE stream")
    assert t["status"] == "ok" and t["completion_tokens"] == 4 and not t["tokens_estimated"]
    assert t["ttft_ms"] is not None and 0 < t["ttft_ms"] <= t["duration_ms"]
    assert json.loads(t["response_body"])["message"]["content"] == text


def test_streaming_with_client_usage_and_no_upstream_usage(keel):
    client = openai.OpenAI(base_url=keel.url + "/v1", api_key="unused")
    chunks = list(
        client.chat.completions.create(
            model="gpt",
            messages=[{"role": "user", "content": "a b"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    list(
        client.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "x [[fake: no_usage]]"}], stream=True
        )
    )
    rows = keel.rows("traces", "ORDER BY started_at_ms")
    assert rows[0]["tokens_estimated"] is False or rows[0]["tokens_estimated"] == 0
    assert rows[1]["tokens_estimated"] and rows[1]["completion_tokens"] > 0


async def test_async_sdk_and_embeddings(keel):
    client = openai.AsyncOpenAI(base_url=keel.url + "/v1", api_key="unused")
    resp = await client.chat.completions.create(
        model="claude",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    )
    assert resp.choices[0].message.content == "Echo: hi"
    emb = await client.embeddings.create(model="emb", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 8
    rows = {r["endpoint"]: r for r in keel.rows()}
    assert rows["embeddings"]["prompt_tokens"] == 2
    assert json.loads(rows["embeddings"]["response_body"])["count"] == 2
    assert rows["chat"]["provider"] == "claude"


def test_models_and_unknown_model(keel):
    r = httpx.get(keel.url + "/v1/models")
    assert {m["id"] for m in r.json()["data"]} == {"gpt", "claude", "hang", "down", "emb"}
    client = openai.OpenAI(base_url=keel.url + "/v1", api_key="unused")
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert "Available models: claude, down, emb, gpt, hang" in str(ei.value)
    assert keel.rows() == []


@pytest.mark.slow
def test_local_model_through_the_gateway(keel_factory):
    """The embedded model answers with no key and no network, streamed and recorded."""
    keel = keel_factory(local={"enabled": True, "max_tokens": 16})
    client = openai.OpenAI(base_url=keel.url + "/v1", api_key="unused")
    resp = client.chat.completions.create(
        model="local", messages=[{"role": "user", "content": "Say hello."}], max_tokens=12
    )
    assert resp.choices[0].message.content.strip()
    chunks = list(
        client.chat.completions.create(
            model="local",
            messages=[{"role": "user", "content": "Count to three."}],
            max_tokens=12,
            stream=True,
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    emb = client.embeddings.create(model="local-embed", input="hello world")
    assert len(emb.data[0].embedding) == 384
    rows = keel.rows("traces", "ORDER BY started_at_ms")
    assert [r["model"] for r in rows] == ["local", "local", "local-embed"]
    assert rows[1]["stream"] and rows[1]["ttft_ms"] is not None
    assert all(r["status"] == "ok" and r["prompt_tokens"] > 0 for r in rows)
    assert not rows[1]["tokens_estimated"]  # llama reports usage on the stream
    ready = httpx.get(keel.url + "/readyz").json()
    assert ready["providers"]["local"] is True
