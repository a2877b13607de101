"""The network seam of the HTTP providers: an injected ``aiohttp.ClientSession``.

Why aiohttp and not httpx here: measured on the 2-core machine with 16
concurrent keep-alive calls to a loopback server (bench/http_clients.py),
httpx's AsyncClient spent ~900 µs of CPU per request (its pool scans every
connection with a socket poll on each request), aiohttp ~60 µs. The gateway's
budget is 500 µs per proxied call in total, so the upstream client is aiohttp;
httpx stays for the CLI and the tests.

Every aiohttp/transport failure is mapped here to :class:`UpstreamError`
(``upstream_unreachable``, ``upstream_connection_lost``) or
:class:`UpstreamTimeout`, so adapters only deal with Keel's errors.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from keel.errors import UpstreamError, UpstreamTimeout

# SSE lines longer than aiohttp's default 64 KiB buffer (big tool-call arguments)
# must not fail the stream.
READ_BUFSIZE = 4 * 1024 * 1024


def make_session(
    *, read_timeout_s: float, connect_timeout_s: float, max_connections: int
) -> aiohttp.ClientSession:
    """A pooled session for one provider. Call from inside the running event loop."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_read=read_timeout_s
        ),
        connector=aiohttp.TCPConnector(limit=max_connections, ttl_dns_cache=300),
        read_bufsize=READ_BUFSIZE,
        json_serialize=lambda o: orjson.dumps(o).decode(),
        auto_decompress=True,
    )


def upstream_error_message(status: int, content: bytes) -> str:
    """The upstream's own error message, from an OpenAI/Anthropic-style body when there is one."""
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


def http_error(provider: str, status: int, content: bytes) -> UpstreamError:
    return UpstreamError(
        f"upstream '{provider}' answered {status}: {upstream_error_message(status, content)}",
        status=status_for_upstream(status),
        upstream_status=status,
    )


def transport_error(provider: str, exc: BaseException) -> UpstreamError:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout(f"upstream '{provider}' timed out (connect timeout)")
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"upstream '{provider}' timed out (read timeout)")
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.InvalidURL):
        return UpstreamError(
            f"upstream '{provider}' could not be reached: {exc}", code="upstream_unreachable"
        )
    return UpstreamError(
        f"upstream '{provider}' broke the connection: {type(exc).__name__}: {exc}",
        code="upstream_connection_lost",
    )


NETWORK_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


async def post_json(
    session: aiohttp.ClientSession,
    provider: str,
    url: str,
    body: bytes,
    headers: dict[str, str],
) -> Any:
    """POST and parse the JSON answer; raise Keel errors for every failure."""
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            content = await resp.read()
            status = resp.status
    except NETWORK_ERRORS as e:
        raise transport_error(provider, e) from e
    if status >= 400:
        raise http_error(provider, status, content)
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError as e:
        raise UpstreamError(
            f"upstream '{provider}' sent a malformed body (not JSON): "
            f"{content[:200].decode('utf-8', 'replace')!r}",
            code="upstream_malformed",
        ) from e


@contextlib.asynccontextmanager
async def open_stream(
    session: aiohttp.ClientSession,
    provider: str,
    url: str,
    body: bytes,
    headers: dict[str, str],
) -> AsyncIterator[aiohttp.ClientResponse]:
    """POST for a stream; an HTTP error status is raised before any event is read."""
    try:
        resp = await session.post(url, data=body, headers=headers)
    except NETWORK_ERRORS as e:
        raise transport_error(provider, e) from e
    try:
        if resp.status >= 400:
            try:
                content = await resp.read()
            except NETWORK_ERRORS:
                content = b""
            raise http_error(provider, resp.status, content)
        yield resp
    finally:
        resp.release()


async def sse_data(resp: aiohttp.ClientResponse, provider: str) -> AsyncIterator[bytes]:
    """The ``data`` of each server-sent event; multi-line data joined by newlines."""
    lines: list[bytes] = []
    try:
        async for raw in resp.content:
            line = raw.rstrip(b"\r\n")
            if not line:
                if lines:
                    yield b"\n".join(lines)
                    lines = []
            elif line.startswith(b"data:"):
                value = line[5:]
                lines.append(value[1:] if value.startswith(b" ") else value)
            # event:, id:, retry: and comments carry nothing the data does not.
    except NETWORK_ERRORS as e:
        raise transport_error(provider, e) from e
    if lines:
        yield b"\n".join(lines)
