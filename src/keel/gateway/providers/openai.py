"""Any OpenAI-compatible server: OpenAI, vLLM, Ollama, llama.cpp server, TGI, LM Studio."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from keel.errors import UpstreamError
from keel.gateway.providers._http import open_stream, post_json, sse_data
from keel.gateway.providers.base import ChatChunk, Provider, register


@register
class OpenAIProvider(Provider):
    kind = "openai"
    supports_embeddings = True

    def _headers(self) -> dict[str, str]:
        h = {"content-type": "application/json", **self.settings.headers}
        if self.api_key:
            h["authorization"] = f"Bearer {self.api_key}"
        return h

    def _malformed(self, what: str) -> UpstreamError:
        return UpstreamError(f"upstream '{self.name}' sent {what}", code="upstream_malformed")

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = await post_json(
            self.session,
            self.name,
            f"{self.settings.base_url}{path}",
            orjson.dumps(body),
            self._headers(),
        )
        if not isinstance(data, dict):
            raise self._malformed("a malformed body (not an object)")
        return data

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        data = await self._post("/chat/completions", body)
        if not isinstance(data.get("choices"), list):
            raise self._malformed("a malformed chat completion (no choices)")
        return data

    async def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        data = await self._post("/embeddings", body)
        if not isinstance(data.get("data"), list):
            raise self._malformed("a malformed embeddings response (no data)")
        return data

    async def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[ChatChunk]:
        url = f"{self.settings.base_url}/chat/completions"
        async with open_stream(
            self.session, self.name, url, orjson.dumps(body), self._headers()
        ) as resp:
            async for raw in sse_data(resp, self.name):
                if raw == b"[DONE]":
                    return
                try:
                    chunk = orjson.loads(raw)
                except orjson.JSONDecodeError as e:
                    raise self._malformed(f"a malformed stream chunk: {raw[:200]!r}") from e
                if not isinstance(chunk, dict):
                    raise self._malformed(f"a malformed stream chunk: {raw[:200]!r}")
                if "error" in chunk and "choices" not in chunk:
                    err = chunk["error"]
                    msg = err.get("message") if isinstance(err, dict) else str(err)
                    raise UpstreamError(
                        f"upstream '{self.name}' failed mid-stream: {msg}",
                        code="upstream_stream_error",
                    )
                yield raw, chunk
