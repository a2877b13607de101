"""Upstream failures and bad input: clear OpenAI-style errors, correct records."""

from __future__ import annotations

import json
import socket

import httpx
import openai
import pytest


def _chat(keel, content, model="gpt", **kw):
    return httpx.post(
        keel.url + "/v1/chat/completions",
        timeout=10,
        json={"model": model, "messages": [{"role": "user", "content": content}], **kw},
    )


@pytest.mark.parametrize(
    ("content", "model", "status", "code_or_type"),
    [
        ("[[fake: error=500]]", "gpt", 502, "upstream_error"),
        ("[[fake: error=503]]", "claude", 502, "upstream_error"),
        ("[[fake: error=400]]", "gpt", 400, "upstream_error"),
        ("[[fake: error=429]]", "gpt", 429, "upstream_error"),
        ("[[fake: malformed]]", "gpt", 502, "upstream_error"),
        ("[[fake: malformed]]", "claude", 502, "upstream_error"),
        ("hi", "hang", 504, "upstream_timeout"),
        ("hi", "down", 502, "upstream_error"),
    ],
)
def test_upstream_failures_become_errors_and_failed_traces(
    keel, content, model, status, code_or_type
):
    r = _chat(keel, content, model=model)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["type"] == code_or_type and err["message"]
    if "error=" in content:
        assert "fake" in err["message"]  # the upstream's own message is passed on
    (t,) = keel.rows()
    assert t["id"] == r.headers["x-keel-trace-id"]
    assert t["status"] == "error" and t["http_status"] == status
    assert t["error_message"] == err["message"] and t["error_type"] == code_or_type


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_stream_refused_upstream_gets_http_status(keel, model):
    r = _chat(keel, "[[fake: error=500]]", model=model, stream=True)
    assert r.status_code == 502 and "fake" in r.json()["error"]["message"]
    (t,) = keel.rows()
    assert t["stream"] and t["status"] == "error"


@pytest.mark.parametrize("model", ["gpt", "claude"])
@pytest.mark.parametrize("directive", ["malformed", "drop"])
def test_failure_mid_stream_is_reported_in_stream_and_recorded(keel, model, directive):
    with httpx.stream(
        "POST",
        keel.url + "/v1/chat/completions",
        timeout=10,
        json={
            "model": model,
            "stream": True,
            "messages": [{"role": "user", "content": f"a b c d e f [[fake: {directive}]]"}],
        },
    ) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    last = json.loads(lines[-1][6:])
    assert "error" in last and last["error"]["type"] == "upstream_error"
    (t,) = keel.rows()
    assert t["status"] == "error" and t["stream"]
    # what was relayed before the failure is kept
    assert json.loads(t["response_body"])["message"]["content"].startswith("Echo:")


def test_client_disconnect_mid_stream_is_recorded_as_cancelled(keel):
    body = json.dumps(
        {
            "model": "gpt",
            "stream": True,
            "messages": [{"role": "user", "content": "[[fake: words=200, chunk_delay=20]]"}],
        }
    ).encode()
    s = socket.create_connection(("127.0.0.1", keel.port))
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
        b"application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    got = b""
    while b"w3" not in got:
        got += s.recv(4096)
    s.close()
    for _ in range(100):
        rows = keel.rows()
        if rows:
            break
        import time

        time.sleep(0.05)
    (t,) = rows
    assert t["status"] == "cancelled" and t["http_status"] == 200
    assert t["error_message"].startswith("the client disconnected")


BAD_BODIES = [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "empty"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "'model' is required"),
    (b'{"model": 5, "messages": []}', 400, "'model' is required"),
    (b'{"model": "gpt"}', 400, "'messages' is required"),
    (b'{"model": "gpt", "messages": []}', 400, "non-empty array"),
    (b'{"model": "gpt", "messages": "hi"}', 400, "non-empty array"),
    (b'{"model": "gpt", "messages": [{"content": "x"}]}', 400, "messages[0]"),
    (b'{"model": "gpt", "messages": [{"role": "user"}], "stream": "yes"}', 400, "'stream'"),
    (b'{"model": "gpt", "messages": [{"role": "user"}], "metadata": 3}', 400, "metadata"),
    (b'{"model": "emb", "messages": [{"role": "user"}]}', 400, "embedding model"),
]


@pytest.mark.parametrize(("body", "status", "needle"), BAD_BODIES)
def test_bad_input_is_a_clear_4xx_and_not_recorded(keel, body, status, needle):
    r = httpx.post(
        keel.url + "/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert keel.rows() == []


def test_oversized_body_is_413(keel_factory):
    keel = keel_factory(gateway={"max_body_bytes": 2048})
    r = _chat(keel, "x" * 5000)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]

    # chunked upload without content-length is cut off too
    def gen():
        yield b'{"model": "gpt", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    r = httpx.post(keel.url + "/v1/chat/completions", content=gen())
    assert r.status_code == 413
    assert keel.rows() == []


def test_bad_tags_header_and_embeddings_input(keel):
    r = httpx.post(
        keel.url + "/v1/chat/completions",
        headers={"X-Keel-Tags": "novalue"},
        json={"model": "gpt", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 400 and "X-Keel-Tags" in r.json()["error"]["message"]
    for bad in ([], [1, "a"], {"a": 1}, None):
        r = httpx.post(keel.url + "/v1/embeddings", json={"model": "emb", "input": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = httpx.post(keel.url + "/v1/embeddings", json={"model": "claude", "input": "x"})
    assert r.status_code == 400 and "does not serve embeddings" in r.json()["error"]["message"]
    assert keel.rows() == []


def test_unknown_route_and_method(keel):
    r = httpx.get(keel.url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(keel.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_sdk_sees_typed_errors(keel):
    client = openai.OpenAI(base_url=keel.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "[[fake: error=500]]"}]
        )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt", messages=[])
