"""Model clients for evaluators: Keel's own gateway, over HTTP or in process.

Judges and embedding evaluators never call a provider directly: they go through
the gateway, so their calls are routed, limited, recorded and priced like any
other (and show up under the ``X-Keel-Feature`` they were given).

- :class:`HttpModelClient` talks to a Keel gateway at a URL (offline
  experiments, a worker process pointed at ``evals.gateway_url``).
- :class:`AppModelClient` calls the running ASGI app of this very process through
  :class:`httpx.ASGITransport` (the online evaluator daemon). When auth is on it
  presents the process's internal token (:func:`keel.auth.guard.internal_token`),
  which never leaves the process.
- :func:`model_client_for` picks one from the settings.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import httpx
import orjson

from keel.errors import ConfigError, KeelError
from keel.evals.base import ChatResult

FEATURE_HEADER = "X-Keel-Feature"
TRACE_HEADER = "x-keel-trace-id"
DEFAULT_TIMEOUT_S = 120.0


class GatewayError(KeelError):
    """The gateway answered a model call with an error (or could not be reached).

    ``status`` is the gateway's HTTP status (502 when unreachable, 504 on a
    timeout); ``error_type`` the ``type`` of its error body; ``trace_id`` the id
    of the recorded failed call, when the gateway recorded one.
    """

    type = "gateway_error"

    def __init__(
        self,
        message: str,
        *,
        status: int,
        error_type: str | None = None,
        code: str | None = None,
        trace_id: str | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code)
        self.error_type = error_type
        self.trace_id = trace_id


def _gateway_root(url: str) -> str:
    """``http://h:4000``, ``http://h:4000/`` and ``http://h:4000/v1`` all mean the same gateway."""
    u = url.strip().rstrip("/")
    return u[: -len("/v1")] if u.endswith("/v1") else u


def _error_from(resp: httpx.Response, what: str) -> GatewayError:
    trace_id = resp.headers.get(TRACE_HEADER)
    message, etype, code = None, None, None
    try:
        body = orjson.loads(resp.content)
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            message, etype, code = err.get("message"), err.get("type"), err.get("code")
        elif isinstance(err, str):
            message = err
    except orjson.JSONDecodeError:
        pass
    if not message:
        message = resp.text[:300] or resp.reason_phrase
    return GatewayError(
        f"{what} failed with HTTP {resp.status_code}: {message}",
        status=resp.status_code,
        error_type=etype,
        code=code,
        trace_id=trace_id,
    )


class _GatewayClient:
    """The shared part: one httpx.AsyncClient against a gateway root."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    async def _post(
        self, path: str, body: dict[str, Any], headers: dict[str, str], what: str
    ) -> tuple[Any, httpx.Response, float]:
        t0 = time.perf_counter()
        try:
            resp = await self._http.post(path, content=orjson.dumps(body), headers=headers)
        except httpx.TimeoutException as e:
            raise GatewayError(f"{what} timed out: {e!r}", status=504, code="timeout") from e
        except httpx.HTTPError as e:
            raise GatewayError(
                f"{what}: cannot reach the gateway at {self._http.base_url}: {e!r}", status=502
            ) from e
        latency_ms = (time.perf_counter() - t0) * 1000
        if resp.status_code >= 300:
            raise _error_from(resp, what)
        try:
            data = orjson.loads(resp.content)
        except orjson.JSONDecodeError as e:
            raise GatewayError(
                f"{what}: the gateway answered with a body that is not JSON",
                status=502,
                trace_id=resp.headers.get(TRACE_HEADER),
            ) from e
        return data, resp, latency_ms

    async def chat(self, body: dict[str, Any], *, feature: str | None = None) -> ChatResult:
        """POST /v1/chat/completions (never streamed); GatewayError on a non-2xx answer."""
        body = {**body, "stream": False}
        headers = {"content-type": "application/json"}
        if feature:
            headers[FEATURE_HEADER] = feature
        data, resp, latency_ms = await self._post(
            "/v1/chat/completions", body, headers, f"chat call to model {body.get('model')!r}"
        )
        if not isinstance(data, dict):
            raise GatewayError("the chat answer is not a JSON object", status=502)
        return ChatResult(
            response=data, trace_id=resp.headers.get(TRACE_HEADER), latency_ms=latency_ms
        )

    async def embed(
        self, texts: list[str], model: str, *, feature: str | None = None
    ) -> list[list[float]]:
        """POST /v1/embeddings; the vectors in the order of ``texts``."""
        if not texts:
            return []
        headers = {"content-type": "application/json"}
        if feature:
            headers[FEATURE_HEADER] = feature
        data, _, _ = await self._post(
            "/v1/embeddings",
            {"model": model, "input": list(texts)},
            headers,
            f"embedding call to model {model!r}",
        )
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list) or len(items) != len(texts):
            raise GatewayError(
                f"embedding model {model!r} returned {len(items or [])} vectors "
                f"for {len(texts)} texts",
                status=502,
            )
        ordered = sorted(items, key=lambda d: d.get("index", 0))
        return [list(map(float, d["embedding"])) for d in ordered]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> _GatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class HttpModelClient(_GatewayClient):
    """A :class:`~keel.evals.base.ModelClient` against a Keel gateway at ``base_url``.

    ``base_url`` may end in ``/v1`` or not. ``api_key`` is sent as a bearer token.
    ``transport`` is the test/network seam (any httpx transport).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_connections: int = 32,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        super().__init__(
            httpx.AsyncClient(
                base_url=_gateway_root(base_url),
                headers=headers,
                timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
                limits=httpx.Limits(
                    max_connections=max_connections, max_keepalive_connections=max_connections
                ),
                transport=transport,
            )
        )
        self.base_url = _gateway_root(base_url)


class AppModelClient(_GatewayClient):
    """Calls the gateway routes of ``app`` (a running Keel app of this process) in process.

    The request goes through the whole ASGI stack (auth, limits, routing,
    recording, pricing), exactly like an external one. With auth on, it is let
    through by the process's internal token as an internal admin principal.
    """

    def __init__(self, app: Any, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not has_gateway(app):
            raise ConfigError(
                "this Keel process does not serve the gateway (role 'gateway'); "
                "set evals.gateway_url so evaluators can call models"
            )
        from keel.auth.guard import INTERNAL_HEADER, internal_token

        super().__init__(
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://keel.internal",
                headers={INTERNAL_HEADER: internal_token()},
                timeout=httpx.Timeout(timeout_s),
            )
        )


def has_gateway(app: Any) -> bool:
    """Whether ``app`` serves the OpenAI-compatible routes (it runs the gateway role)."""
    return _serves(getattr(app, "routes", None) or (), "/v1/chat/completions", 0)


def _serves(routes: Any, path: str, depth: int) -> bool:
    # FastAPI may keep included routers as wrappers (``original_router``): look inside.
    if depth > 5:
        return False
    for r in routes:
        if getattr(r, "path", None) == path:
            return True
        inner = getattr(r, "original_router", None) or r
        sub = getattr(inner, "routes", None)
        if sub is not None and sub is not routes and _serves(sub, path, depth + 1):
            return True
    return False


def model_client_for(
    app: Any | None, evals: Any, environ: Mapping[str, str]
) -> HttpModelClient | AppModelClient:
    """The client evaluators should use, from ``settings.evals``.

    ``evals.gateway_url`` when set (with the key from ``evals.api_key_env``);
    else this process's own app when it serves the gateway; else ConfigError.
    """
    url = getattr(evals, "gateway_url", None)
    if url:
        env_name = getattr(evals, "api_key_env", None)
        key = environ.get(env_name) if env_name else None
        if env_name and not key:
            raise ConfigError(
                f"evals.api_key_env names {env_name}, but that environment variable is not set"
            )
        return HttpModelClient(url, key)
    if app is not None and has_gateway(app):
        return AppModelClient(app)
    raise ConfigError(
        "evaluators that call models need a gateway: this process does not serve one "
        "(role 'gateway'); set evals.gateway_url (and evals.api_key_env)"
    )
