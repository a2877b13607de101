"""An httpx transport over aiohttp, for the experiment runner's many gateway calls.

:class:`keel.evals.client.HttpModelClient` speaks httpx, whose connection pool
checks every idle connection with a socket poll on each request: ~1 ms of CPU
per call on a 2-core machine (see ``bench/http_clients.py``), which made the
runner, not the model, the bottleneck of a 1,000-item experiment. The client
takes a transport (its network seam); this one hands each request to an
``aiohttp`` session (~0.1 ms per call), as the gateway does for its upstreams.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import httpx

from keel.gateway.providers._http import make_session

# Hop-by-hop or body-framing headers: aiohttp sets its own.
_SKIP_REQUEST = frozenset({"host", "content-length", "connection", "transfer-encoding"})
# aiohttp has already decoded the body, so these no longer describe it.
_SKIP_RESPONSE = frozenset({"content-encoding", "content-length", "transfer-encoding"})


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests with one pooled ``aiohttp.ClientSession`` (made on first use)."""

    def __init__(self, *, max_connections: int = 32, timeout_s: float = 120.0) -> None:
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _make_session(self) -> aiohttp.ClientSession:
        # The gateway's own upstream session: the same pooling and timeouts.
        return make_session(
            read_timeout_s=self.timeout_s,
            connect_timeout_s=min(10.0, self.timeout_s),
            max_connections=self.max_connections,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None or self._session.closed:
            self._session = self._make_session()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP_REQUEST}
        body = await request.aread()
        try:
            async with self._session.request(
                request.method, str(request.url), data=body or None, headers=headers
            ) as resp:
                content = await resp.read()
                out_headers = [
                    (k, v) for k, v in resp.headers.items() if k.lower() not in _SKIP_RESPONSE
                ]
                status = resp.status
        except (TimeoutError, aiohttp.ServerTimeoutError) as e:
            raise httpx.ReadTimeout(f"timed out: {e}", request=request) from e
        except (aiohttp.ClientConnectorError, aiohttp.InvalidURL) as e:
            raise httpx.ConnectError(str(e), request=request) from e
        except (aiohttp.ClientError, OSError) as e:
            raise httpx.ReadError(f"{type(e).__name__}: {e}", request=request) from e
        return httpx.Response(status, headers=out_headers, content=content, request=request)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def gateway_client(url: str, api_key: str | None, *, concurrency: int) -> Any:
    """The runner's :class:`HttpModelClient`: aiohttp underneath, a connection per item in
    flight plus headroom for judges' calls."""
    from keel.evals.client import DEFAULT_TIMEOUT_S, HttpModelClient

    conns = max(32, 2 * concurrency)
    return HttpModelClient(
        url,
        api_key,
        max_connections=conns,
        transport=AiohttpTransport(max_connections=conns, timeout_s=DEFAULT_TIMEOUT_S),
    )
