"""The Anthropic adapter against the fake upstream's real Messages API server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest

from keel.config import ProviderSettings
from keel.errors import InvalidRequest, UpstreamError, UpstreamTimeout
from keel.gateway.providers._http import make_session
from keel.gateway.providers.anthropic import (
    AnthropicProvider,
    StreamTranslator,
    from_anthropic,
    to_anthropic,
)
from keel.gateway.providers.base import PROVIDER_KINDS
from keel.testing.fake_upstream import FakeUpstream


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    yield server
    server.stop()


def make_provider(
    base_url: str | None, read_timeout: float = 2.0, **settings: Any
) -> AnthropicProvider:
    return AnthropicProvider(
        "claude",
        ProviderSettings(kind="anthropic", base_url=base_url, **settings),
        session_factory=lambda: make_session(
            read_timeout_s=read_timeout, connect_timeout_s=2.0, max_connections=10
        ),
        api_key="sk-test",
    )


@pytest.fixture
async def provider(fake: FakeUpstream) -> AsyncIterator[AnthropicProvider]:
    p = make_provider(fake.root_url)
    yield p
    await p.close_session()


def user(text: str, model: str = "claude-test", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


async def collect(p: AnthropicProvider, body: dict[str, Any]) -> list[dict[str, Any]]:
    chunks = []
    async for raw, chunk in p.chat_stream(body):
        assert orjson.loads(raw) == chunk
        chunks.append(chunk)
    return chunks


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# -- registry and settings ------------------------------------------------------


def test_registered_and_defaults_to_the_public_api() -> None:
    assert PROVIDER_KINDS["anthropic"] is AnthropicProvider
    assert AnthropicProvider.supports_embeddings is False
    p = AnthropicProvider("claude", ProviderSettings(kind="anthropic"))
    assert p._url() == "https://api.anthropic.com/v1/messages"


# -- request translation ---------------------------------------------------------


async def test_request_translation_and_headers(
    fake: FakeUpstream, provider: AnthropicProvider
) -> None:
    await provider.chat(
        {
            "model": "claude-test",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "No emoji."}]},
                {"role": "user", "content": "hello"},
                {"role": "user", "content": [{"type": "text", "text": "again"}]},
            ],
            "stop": ["END", "STOP"],
            "temperature": 0.2,
            "top_p": 0.9,
            "user": "u-42",
            "n": 1,
            "frequency_penalty": 0.5,
            "stream_options": {"include_usage": True},
        }
    )
    sent = fake.requests[-1]
    assert sent == {
        "model": "claude-test",
        "system": "Be brief.\n\nNo emoji.",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "again"}],
            }
        ],
        "max_tokens": 4096,
        "stop_sequences": ["END", "STOP"],
        "temperature": 0.2,
        "top_p": 0.9,
        "metadata": {"user_id": "u-42"},
    }
    headers = fake.headers[-1]
    assert headers["x-api-key"] == "sk-test"
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["content-type"] == "application/json"
    assert "authorization" not in headers


async def test_custom_headers_and_version(fake: FakeUpstream) -> None:
    p = make_provider(
        fake.root_url, anthropic_version="2099-01-01", headers={"anthropic-beta": "cache-1"}
    )
    try:
        await p.chat(user("hi"))
    finally:
        await p.close_session()
    assert fake.headers[-1]["anthropic-version"] == "2099-01-01"
    assert fake.headers[-1]["anthropic-beta"] == "cache-1"


async def test_max_tokens_and_stop_string(fake: FakeUpstream, provider: AnthropicProvider) -> None:
    await provider.chat(user("hi", max_tokens=50, stop="\n\n"))
    assert fake.requests[-1]["max_tokens"] == 50
    assert fake.requests[-1]["stop_sequences"] == ["\n\n"]
    await provider.chat(user("hi", max_tokens=50, max_completion_tokens=70))
    assert fake.requests[-1]["max_tokens"] == 70
    assert "stop_sequences" not in fake.requests[-1]


async def test_tools_tool_calls_and_tool_results(
    fake: FakeUpstream, provider: AnthropicProvider
) -> None:
    weather = {"type": "object", "properties": {"city": {"type": "string"}}}
    out = await provider.chat(
        {
            "model": "claude-test",
            "messages": [
                {"role": "user", "content": "weather in Paris and Rome?"},
                {
                    "role": "assistant",
                    "content": "Let me look.",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                        },
                        {
                            "id": "call_2",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city": "Rome"}'},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {
                    "role": "tool",
                    "tool_call_id": "call_2",
                    "content": [{"type": "text", "text": "rainy"}],
                },
                {"role": "user", "content": "so?"},
            ],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "weather",
                        "description": "Current weather",
                        "parameters": weather,
                    },
                },
                {"type": "function", "function": {"name": "now"}},
            ],
            "tool_choice": {"type": "function", "function": {"name": "weather"}},
        }
    )
    sent = fake.requests[-1]
    assert sent["tools"] == [
        {"name": "weather", "description": "Current weather", "input_schema": weather},
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert sent["tool_choice"] == {"type": "tool", "name": "weather"}
    assert sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "weather in Paris and Rome?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "weather", "input": {"city": "Rome"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "rainy"},
                {"type": "text", "text": "so?"},
            ],
        },
    ]
    assert out["choices"][0]["message"]["content"] == "Echo: so?"


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ("none", {"type": "none"}),
        ({"type": "function", "function": {"name": "f"}}, {"type": "tool", "name": "f"}),
    ],
)
def test_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    out = to_anthropic(user("x", tools=tools, tool_choice=choice))
    assert out["tool_choice"] == expected


def test_parallel_tool_calls_false_and_tool_choice_without_tools() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    out = to_anthropic(user("x", tools=tools, parallel_tool_calls=False))
    assert out["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert "tool_choice" not in to_anthropic(user("x", tool_choice="none"))


async def test_image_parts(fake: FakeUpstream, provider: AnthropicProvider) -> None:
    await provider.chat(
        {
            "model": "claude-test",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64,iVBORw0K"},
                        },
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                    ],
                }
            ],
        }
    )
    assert fake.requests[-1]["messages"][0]["content"] == [
        {"type": "text", "text": "what is this?"},
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"},
        },
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"model": "m", "messages": "hi"}, "'messages' must be a list"),
        ({"model": "m", "messages": [{"content": "hi"}]}, "messages[0]: the message has no 'role'"),
        ({"model": "m", "messages": ["hi"]}, "a message must be an object"),
        ({"model": "m", "messages": [{"role": "function", "content": "x"}]}, "role 'function'"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "'content' must be"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "'input_audio' is not supported",
        ),
        (
            {
                "model": "m",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}],
                    }
                ],
            },
            "image URL must be",
        ),
        (
            {
                "model": "m",
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{"},
                            }
                        ],
                    }
                ],
            },
            "not valid JSON",
        ),
        ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
        (user("x", n=2), "'n' must be 1"),
        (user("x", tools=[{"type": "code_interpreter"}]), "type 'function'"),
        (
            user("x", tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="maybe"),
            "'tool_choice' must be",
        ),
        (user("x", stop=5), "'stop' must be"),
    ],
)
async def test_invalid_shapes(
    fake: FakeUpstream, provider: AnthropicProvider, body: dict[str, Any], fragment: str
) -> None:
    before = len(fake.requests)
    with pytest.raises(InvalidRequest) as info:
        await provider.chat(body)
    assert fragment in info.value.message
    assert info.value.status == 400
    with pytest.raises(InvalidRequest):
        await collect(provider, body)
    assert len(fake.requests) == before  # nothing was sent upstream


# -- responses -------------------------------------------------------------------


async def test_text_reply_and_usage_with_cache_tokens(provider: AnthropicProvider) -> None:
    out = await provider.chat(user("hello there", model="fake:cache_read=5,cache_write=7"))
    assert out["id"] == "chatcmpl-msg_fake"
    assert out["object"] == "chat.completion"
    assert isinstance(out["created"], int)
    assert out["model"] == "fake:cache_read=5,cache_write=7"
    assert out["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Echo: hello there"},
            "finish_reason": "stop",
        }
    ]
    # The fake counts 2 words + 3 per message as input, the 3 reply words as output.
    assert out["usage"] == {
        "prompt_tokens": 5 + 5 + 7,
        "completion_tokens": 3,
        "total_tokens": 20,
        "prompt_tokens_details": {"cached_tokens": 5},
        "anthropic": {
            "input_tokens": 5,
            "output_tokens": 3,
            "cache_read_input_tokens": 5,
            "cache_creation_input_tokens": 7,
        },
    }


def test_tool_use_reply_translation() -> None:
    out = from_anthropic(
        {
            "id": "msg_1",
            "model": "claude-x",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}},
            ],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 10, "output_tokens": 4, "cache_read_input_tokens": None},
        }
    )
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
            }
        ],
    }
    assert out["usage"]["prompt_tokens"] == 10
    assert out["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert (
        from_anthropic({"content": [], "stop_reason": "max_tokens"})["choices"][0]["finish_reason"]
        == "length"
    )


async def test_stream_reassembles_the_same_text_and_usage(
    fake: FakeUpstream, provider: AnthropicProvider
) -> None:
    model = "fake:cache_read=5,cache_write=7"
    whole = await provider.chat(user("one two three four", model=model))
    chunks = await collect(
        provider, user("one two three four", model=model, stream_options={"include_usage": True})
    )
    assert fake.requests[-1]["stream"] is True
    assert "stream_options" not in fake.requests[-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["id"] == "chatcmpl-msg_fake" for c in chunks)
    assert text_of(chunks) == whole["choices"][0]["message"]["content"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == whole["usage"]

    plain = await collect(provider, user("one two three four", model=model))
    assert text_of(plain) == text_of(chunks)
    assert all("usage" not in c for c in plain)


def test_stream_translator_tool_calls_and_error_event() -> None:
    t = StreamTranslator("claude", "m", include_usage=True)
    events = [
        {
            "type": "message_start",
            "message": {"id": "msg_9", "model": "claude-x", "usage": {"input_tokens": 12}},
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": '{"a": '},
        },
        {"type": "ping"},
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": "1}"},
        },
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use"},
            "usage": {"output_tokens": 9},
        },
        {"type": "message_stop"},
    ]
    chunks = [c for e in events for c in t.feed(e)]
    assert t.done
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[1] == {"content": "Hi"}
    assert deltas[2] == {
        "tool_calls": [
            {
                "index": 0,
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "f", "arguments": ""},
            }
        ]
    }
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas if "tool_calls" in d)
    assert orjson.loads(args) == {"a": 1}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["prompt_tokens"] == 12
    assert chunks[-1]["usage"]["completion_tokens"] == 9
    assert all(c["id"] == "chatcmpl-msg_9" and c["model"] == "claude-x" for c in chunks)

    with pytest.raises(UpstreamError, match="Overloaded") as info:
        StreamTranslator("claude", "m", False).feed(
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        )
    assert info.value.status == 502


# -- failures --------------------------------------------------------------------


async def test_upstream_500_is_502_with_its_message(provider: AnthropicProvider) -> None:
    for call in (provider.chat, lambda b: collect(provider, b)):
        with pytest.raises(UpstreamError) as info:
            await call(user("hi [[fake: error=500]]"))
        assert info.value.status == 502
        assert info.value.upstream_status == 500
        assert "fake anthropic error 500" in info.value.message


async def test_upstream_400_passes_through(provider: AnthropicProvider) -> None:
    for call in (provider.chat, lambda b: collect(provider, b)):
        with pytest.raises(UpstreamError) as info:
            await call(user("hi", model="fake:error=400"))
        assert info.value.status == 400
        assert info.value.message == "upstream 'claude' answered 400: fake anthropic error 400"


async def test_malformed_body(provider: AnthropicProvider) -> None:
    with pytest.raises(UpstreamError) as info:
        await provider.chat(user("hi", model="fake:malformed"))
    assert info.value.code == "upstream_malformed"
    assert info.value.status == 502
    assert "<html>oops</html>" in info.value.message


async def test_malformed_stream_event(provider: AnthropicProvider) -> None:
    seen: list[dict[str, Any]] = []
    with pytest.raises(UpstreamError) as info:
        async for _, chunk in provider.chat_stream(user("hi", model="fake:malformed,words=6")):
            seen.append(chunk)
    assert info.value.code == "upstream_malformed"
    assert "{broken" in info.value.message
    assert seen  # the chunks before the bad event were delivered


async def test_hang_is_a_timeout(fake: FakeUpstream) -> None:
    p = make_provider(fake.root_url, read_timeout=0.3)
    try:
        with pytest.raises(UpstreamTimeout) as info:
            await p.chat(user("hi", model="fake:hang"))
        assert info.value.status == 504
        with pytest.raises(UpstreamTimeout):
            await collect(p, user("hi", model="fake:hang"))
    finally:
        await p.close_session()


async def test_dropped_stream(provider: AnthropicProvider) -> None:
    with pytest.raises(UpstreamError) as info:
        await collect(provider, user("hi", model="fake:drop,words=6"))
    assert not isinstance(info.value, UpstreamTimeout)
    assert info.value.status == 502
    assert info.value.code == "upstream_connection_lost"


async def test_unreachable_upstream() -> None:
    never_started = FakeUpstream()
    p = make_provider(never_started.root_url)
    try:
        with pytest.raises(UpstreamError) as info:
            await p.chat(user("hi"))
        assert info.value.code == "upstream_unreachable"
    finally:
        await p.close_session()
