"""Any OpenAI-compatible server: OpenAI, vLLM, Ollama, llama.cpp server, TGI, LM Studio."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from keel.errors import UpstreamError, UpstreamTimeout
from keel.gateway.providers.base import ChatChunk, Provider, register


def upstream_error_message(status: int, content: bytes) -> str:
    """The upstream's own error message, from an OpenAI-style body when there is one."""
    try:
        data = orjson.loads(content)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if isinstance(data, dict) and data.get("message"):
            return str(data["message"])
    except (orjson.JSONDecodeError, TypeError, AttributeError):
        pass
    text = content.decode("utf-8", "replace").strip()
    return text[:500] or f"HTTP {status}"


def status_for_upstream(status: int) -> int:
    """Client errors of the upstream are the caller's (passed through); others are 502."""
    if 400 <= status < 500:
        return status
    return 502


def transport_error(provider: str, exc: Exception) -> UpstreamError:
    if isinstance(exc, httpx.TimeoutException):
        kind = "connect" if isinstance(exc, httpx.ConnectTimeout) else "read"
        return UpstreamTimeout(f"upstream '{provider}' timed out ({kind} timeout)")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamError(
            f"upstream '{provider}' could not be reached: {exc}", code="upstream_unreachable"
        )
    return UpstreamError(
        f"upstream '{provider}' broke the connection: {type(exc).__name__}: {exc}",
        code="upstream_connection_lost",
    )


@register
class OpenAIProvider(Provider):
    kind = "openai"
    supports_embeddings = True

    def _headers(self) -> dict[str, str]:
        h = {"content-type": "application/json", **self.settings.headers}
        if self.api_key:
            h["authorization"] = f"Bearer {self.api_key}"
        return h

    def _url(self, path: str) -> str:
        return f"{self.settings.base_url}{path}"

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self.client is not None
        try:
            resp = await self.client.post(
                self._url(path), content=orjson.dumps(body), headers=self._headers()
            )
        except httpx.HTTPError as e:
            raise transport_error(self.name, e) from e
        if resp.status_code >= 400:
            raise UpstreamError(
                f"upstream '{self.name}' answered {resp.status_code}: "
                f"{upstream_error_message(resp.status_code, resp.content)}",
                status=status_for_upstream(resp.status_code),
                upstream_status=resp.status_code,
            )
        try:
            data = orjson.loads(resp.content)
        except orjson.JSONDecodeError as e:
            raise UpstreamError(
                f"upstream '{self.name}' sent a malformed body (not JSON): "
                f"{resp.content[:200].decode('utf-8', 'replace')!r}",
                code="upstream_malformed",
            ) from e
        if not isinstance(data, dict):
            raise UpstreamError(
                f"upstream '{self.name}' sent a malformed body (not an object)",
                code="upstream_malformed",
            )
        return data

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        data = await self._post("/chat/completions", body)
        if not isinstance(data.get("choices"), list):
            raise UpstreamError(
                f"upstream '{self.name}' sent a malformed chat completion (no choices)",
                code="upstream_malformed",
            )
        return data

    async def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        data = await self._post("/embeddings", body)
        if not isinstance(data.get("data"), list):
            raise UpstreamError(
                f"upstream '{self.name}' sent a malformed embeddings response (no data)",
                code="upstream_malformed",
            )
        return data

    async def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[ChatChunk]:
        assert self.client is not None
        req = self.client.build_request(
            "POST",
            self._url("/chat/completions"),
            content=orjson.dumps(body),
            headers=self._headers(),
        )
        try:
            resp = await self.client.send(req, stream=True)
        except httpx.HTTPError as e:
            raise transport_error(self.name, e) from e
        try:
            if resp.status_code >= 400:
                content = await resp.aread()
                raise UpstreamError(
                    f"upstream '{self.name}' answered {resp.status_code}: "
                    f"{upstream_error_message(resp.status_code, content)}",
                    status=status_for_upstream(resp.status_code),
                    upstream_status=resp.status_code,
                )
            try:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # comments, event names, keep-alives
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        return
                    raw = payload.encode()
                    try:
                        chunk = orjson.loads(raw)
                    except orjson.JSONDecodeError as e:
                        raise UpstreamError(
                            f"upstream '{self.name}' sent a malformed stream chunk: "
                            f"{payload[:200]!r}",
                            code="upstream_malformed",
                        ) from e
                    if isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk:
                        err = chunk["error"]
                        msg = err.get("message") if isinstance(err, dict) else str(err)
                        raise UpstreamError(
                            f"upstream '{self.name}' failed mid-stream: {msg}",
                            code="upstream_stream_error",
                        )
                    yield raw, chunk
            except httpx.HTTPError as e:
                raise transport_error(self.name, e) from e
        finally:
            await resp.aclose()
