"""OpenAI-compatible routes: /v1/chat/completions, /v1/embeddings, /v1/models.

The handlers read the raw body and parse it with orjson instead of declaring a
pydantic body: the gateway must forward every field it does not know, and a
full validation on the hot path costs more than the rest of the proxy. The
OpenAPI schema still documents the bodies (``openapi_extra``, in
:mod:`keel.gateway.schemas`); the stream relay lives in :mod:`keel.gateway.streaming`.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from keel._body import read_body
from keel.config import GatewaySettings, RecorderSettings
from keel.errors import InvalidRequest, KeelError
from keel.gateway.calls import (
    Attribution,
    Call,
    check_chat_body,
    check_embeddings_body,
    clip_body,
    estimate_tokens,
    make_trace,
    messages_text,
)
from keel.gateway.resilience import with_failover
from keel.gateway.router import Alias, Deployment, Router
from keel.gateway.schemas import CHAT_SCHEMA, EMBED_SCHEMA, JSON
from keel.gateway.streaming import choice_text, relay, replay_sse
from keel.monitoring.metrics import GatewayMetrics
from keel.prompts.gateway import expand_prompt
from keel.store.recorder import Recorder
from keel.tracing.model import TraceRecord

log = logging.getLogger("keel.gateway")

TRACE_HEADER = "x-keel-trace-id"


def error_response(err: KeelError, trace_id: str | None = None) -> Response:
    headers = {TRACE_HEADER: trace_id} if trace_id else None
    return Response(
        orjson.dumps(err.to_body()), status_code=err.status, media_type=JSON, headers=headers
    )


class Gateway:
    def __init__(
        self,
        router: Router,
        recorder: Recorder,
        gateway: GatewaySettings,
        recording: RecorderSettings,
        metrics: GatewayMetrics | None = None,
        pricer: Any = None,
        limits: Any = None,
        prompts: Any = None,
    ) -> None:
        self.router = router
        self.pricer = pricer
        self.limits = limits
        self.prompts = prompts
        registry = metrics.inflight if metrics is not None else None
        self._inflight_chat = registry.labels("chat") if registry is not None else None
        self._inflight_embed = registry.labels("embeddings") if registry is not None else None
        self.recorder = recorder
        self.max_body = gateway.max_body_bytes
        self.capture = recording.capture_bodies
        self.max_chars = recording.max_body_chars

    # -- plumbing -----------------------------------------------------------

    async def _read_json(self, request: Request) -> tuple[bytes, Any]:
        raw = await read_body(request, self.max_body)
        if not raw:
            raise InvalidRequest("the request body is empty; send a JSON object")
        try:
            return raw, orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise InvalidRequest(f"the request body is not valid JSON: {e}") from None

    def _record(self, **kw: Any) -> TraceRecord | None:
        # Telemetry never breaks the caller.
        try:
            rec = make_trace(**kw)
            if self.pricer is not None:
                self.pricer.price(rec)  # ≈ 0.7 µs; budgets need the cost right away
            self.recorder.record(rec)
            adm = kw["call"].admission
            if adm is not None and self.limits is not None:
                self.limits.settle(
                    adm, tokens=rec.get("total_tokens") or 0, cost_usd=rec.get("cost_usd")
                )
            return rec
        except Exception:
            log.exception("could not record trace")
            return None

    def _req_text(self, raw: bytes) -> str | None:
        if not self.capture:
            return None
        return clip_body(raw.decode("utf-8", "replace"), self.max_chars)

    # -- routes -------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        gauge = self._inflight_chat
        if gauge is None:
            return await self._chat(request, None)
        gauge.inc()
        streaming = False
        try:
            resp = await self._chat(request, gauge)
            streaming = isinstance(resp, StreamingResponse)
            return resp
        finally:
            if not streaming:  # a stream decrements when its relay ends
                gauge.dec()

    async def _chat(self, request: Request, gauge: Any) -> Response:
        call = Call("chat", request.client.host if request.client else None)
        call.join_trace(request.headers.get("traceparent"))
        try:
            raw, body = await self._read_json(request)
            routed: Alias | None = None
            if type(body) is dict and "variables" in body and "prompt" not in body:
                body, routed = await self._route_prompt(body)
            if self.prompts is not None:
                body, call.prompt_version_id = expand_prompt(self.prompts, body)
            check_chat_body(body)
            attribution = Attribution.from_request(request.headers, body)
            alias = routed or await self.router.aresolve(body["model"])
            if alias.kind != "chat":
                raise InvalidRequest(
                    f"'{alias.name}' is an embedding model; use /v1/embeddings", param="model"
                )
            attribution.key_id = _check_key(request, alias.name)
            call.admission = await self._admit(request, alias.name, attribution)
        except KeelError as e:
            return _refusal(e, call.id)
        cache_key = None
        ttl = alias.settings.cache_ttl_s if alias.settings is not None else None
        if ttl and self.limits is not None:
            # Per served version: a canary must not answer with the stable's cached output.
            cache_key = self.limits.cache.key(alias.route_version or alias.name, body)
            hit = await self.limits.cache.get(cache_key)
            if hit is not None:
                return self._cached(call, alias, body, raw, attribution, hit)
        if body.get("stream"):
            return await self._stream(call, alias, body, raw, attribution, gauge)
        last: list[Deployment] = []
        try:
            resp, outcome = await with_failover(
                alias,
                lambda d: d.provider.chat(_upstream_body(d, body)),
                on_attempt=last.append,
            )
        except KeelError as e:
            self._record(
                call=call,
                stream=False,
                http_status=e.status,
                request_body=self._req_text(raw),
                response_body=None,
                usage=None,
                error=e,
                **_common(alias, last[-1], attribution, len(last)),
            )
            return error_response(e, call.id)
        out = orjson.dumps(resp)
        usage = resp.get("usage") if isinstance(resp.get("usage"), dict) else None
        est = None
        if usage is None:
            est = (
                estimate_tokens(messages_text(body["messages"])),
                estimate_tokens(choice_text(resp)),
            )
        self._record(
            call=call,
            stream=False,
            http_status=200,
            request_body=self._req_text(raw),
            response_body=self._resp_text(out),
            usage=usage,
            estimated_tokens=est,
            **_common(alias, outcome.deployment, attribution, outcome.attempts, outcome.tried),
        )
        if cache_key is not None and ttl:
            self.limits.cache.put(cache_key, out, ttl)
        return Response(out, media_type=JSON, headers={TRACE_HEADER: call.id})

    async def _route_prompt(self, body: dict[str, Any]) -> tuple[dict[str, Any], Alias | None]:
        """A call that sends ``variables`` without messages gets its routed version's prompt.

        The split is drawn here, once: the caller keeps the alias it returns.
        """
        model = body.get("model")
        if not isinstance(model, str) or not model or body.get("messages"):
            return body, None
        alias = await self.router.aresolve(model)
        if alias.prompt:
            body = {**body, "prompt": alias.prompt}
        return body, alias

    def _resp_text(self, out: bytes) -> str | None:
        if not self.capture:
            return None
        return clip_body(out.decode("utf-8", "replace"), self.max_chars)

    async def _admit(self, request: Request, alias: str, attribution: Attribution) -> Any:
        """Rate limits and hard budgets for this call (429 when over), counted now."""
        if self.limits is None:
            return None
        p = getattr(request.state, "keel_principal", None)
        return await self.limits.admit(
            key_id=p.id if p else None,
            key_name=p.name if p else None,
            key_rpm=p.rpm if p else None,
            key_tpm=p.tpm if p else None,
            key_budget=(p.budget_usd, p.budget_period or "month") if p and p.budget_usd else None,
            alias=alias,
            user=attribution.user,
            feature=attribution.feature,
        )

    def _cached(
        self,
        call: Call,
        alias: Alias,
        body: dict[str, Any],
        raw: bytes,
        attribution: Attribution,
        hit: bytes,
    ) -> Response:
        """Answer from the response cache: recorded as a hit, priced at 0."""
        call.cache_hit = True
        resp = orjson.loads(hit)
        usage = resp.get("usage") if isinstance(resp.get("usage"), dict) else None
        dep = alias.deployments[0]
        common = _common(alias, dep, attribution, 1)
        if self.pricer is not None and usage:
            saved = self.pricer.catalog.cost(
                dep.provider.name,
                dep.model,
                prompt_tokens=usage.get("prompt_tokens") or 0,
                completion_tokens=usage.get("completion_tokens") or 0,
                started_at_ms=call.started_at_ms,
            )
            if saved is not None:
                common["attribution"].tags = {
                    **common["attribution"].tags,
                    "_cache_saved_usd": f"{saved:.8f}",
                }
        stream = bool(body.get("stream"))
        call.mark_first_token()
        self._record(
            call=call,
            stream=stream,
            http_status=200,
            request_body=self._req_text(raw),
            response_body=self._resp_text(hit),
            usage=usage,
            **common,
        )
        headers = {TRACE_HEADER: call.id, "x-keel-cache": "hit"}
        if not stream:
            return Response(hit, media_type=JSON, headers=headers)
        opts = body.get("stream_options") or {}
        return StreamingResponse(
            replay_sse(resp, bool(opts.get("include_usage"))),
            media_type="text/event-stream",
            headers=headers,
        )

    async def _stream(
        self,
        call: Call,
        alias: Alias,
        body: dict[str, Any],
        raw: bytes,
        attribution: Attribution,
        gauge: Any = None,
    ) -> Response:
        client_opts = body.get("stream_options") or {}
        client_wants_usage = bool(client_opts.get("include_usage"))

        async def attempt(dep: Deployment) -> tuple[Any, Any]:
            upstream = _upstream_body(dep, body)
            if dep.provider.reports_stream_usage:
                upstream["stream_options"] = {**client_opts, "include_usage": True}
            agen = dep.provider.chat_stream(upstream)
            # Wait for the first chunk before answering, so that an upstream that
            # refuses the call gets a real HTTP error status (and a retry on
            # another deployment), not a 200 with an error inside the stream.
            try:
                first = await agen.__anext__()
            except StopAsyncIteration:
                first = None
            except BaseException:
                await agen.aclose()
                raise
            return agen, first

        last: list[Deployment] = []
        try:
            (agen, first), outcome = await with_failover(alias, attempt, on_attempt=last.append)
        except KeelError as e:
            self._record(
                call=call,
                stream=True,
                http_status=e.status,
                request_body=self._req_text(raw),
                response_body=None,
                usage=None,
                error=e,
                **_common(alias, last[-1], attribution, len(last)),
            )
            return error_response(e, call.id)
        common = _common(alias, outcome.deployment, attribution, outcome.attempts, outcome.tried)
        return StreamingResponse(
            relay(
                call,
                agen,
                first,
                body["messages"],
                common,
                client_wants_usage,
                gauge,
                record=self._record,
                request_body=self._req_text(raw),
                capture=self.capture,
                max_chars=self.max_chars,
            ),
            media_type="text/event-stream",
            headers={TRACE_HEADER: call.id, "cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def embeddings(self, request: Request) -> Response:
        gauge = self._inflight_embed
        if gauge is not None:
            gauge.inc()
        try:
            return await self._embeddings(request)
        finally:
            if gauge is not None:
                gauge.dec()

    async def _embeddings(self, request: Request) -> Response:
        call = Call("embeddings", request.client.host if request.client else None)
        call.join_trace(request.headers.get("traceparent"))
        try:
            raw, body = await self._read_json(request)
            check_embeddings_body(body)
            attribution = Attribution.from_request(request.headers, body)
            alias = await self.router.aresolve(body["model"])
            if alias.kind != "embedding" and not alias.deployments[0].provider.supports_embeddings:
                raise InvalidRequest(f"'{alias.name}' does not serve embeddings", param="model")
            attribution.key_id = _check_key(request, alias.name)
            call.admission = await self._admit(request, alias.name, attribution)
        except KeelError as e:
            return _refusal(e, call.id)
        last: list[Deployment] = []
        try:
            resp, outcome = await with_failover(
                alias,
                lambda d: d.provider.embeddings(_upstream_body(d, body)),
                on_attempt=last.append,
            )
        except KeelError as e:
            self._record(
                call=call,
                stream=False,
                http_status=e.status,
                request_body=self._req_text(raw),
                response_body=None,
                usage=None,
                error=e,
                **_common(alias, last[-1], attribution, len(last)),
            )
            return error_response(e, call.id)
        common = _common(alias, outcome.deployment, attribution, outcome.attempts, outcome.tried)
        out = orjson.dumps(resp)
        usage = resp.get("usage") if isinstance(resp.get("usage"), dict) else None
        if usage is not None and "completion_tokens" not in usage:
            usage = {**usage, "completion_tokens": 0}
        summary = None
        if self.capture:
            # Vectors are not worth storing; their count and size are.
            data = resp.get("data") or []
            first = data[0].get("embedding") if data and isinstance(data[0], dict) else None
            dims = len(first) if isinstance(first, list) else None
            summary = orjson.dumps(
                {"object": "list", "count": len(data), "dimensions": dims, "usage": usage}
            ).decode()
        est = None
        if usage is None:
            inp = body["input"]
            est = (estimate_tokens(inp if isinstance(inp, str) else " ".join(map(str, inp))), 0)
        self._record(
            call=call,
            stream=False,
            http_status=200,
            request_body=self._req_text(raw),
            response_body=summary,
            usage=usage,
            estimated_tokens=est,
            **common,
        )
        return Response(out, media_type=JSON, headers={TRACE_HEADER: call.id})

    async def models(self) -> Response:
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "keel",
                "kind": self.router.aliases[name].kind,
            }
            for name in self.router.names()
        ]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type=JSON)

    async def model(self, model: str) -> Response:
        try:
            alias = self.router.resolve(model)
        except KeelError as e:
            return error_response(e)
        return Response(
            orjson.dumps(
                {
                    "id": alias.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "keel",
                    "kind": alias.kind,
                }
            ),
            media_type=JSON,
        )

    def api_router(self) -> APIRouter:
        r = APIRouter(tags=["gateway"])
        r.add_api_route(
            "/v1/chat/completions",
            self.chat_completions,
            methods=["POST"],
            summary="Create a chat completion (OpenAI-compatible)",
            openapi_extra=CHAT_SCHEMA,
            response_class=Response,
        )
        r.add_api_route(
            "/v1/embeddings",
            self.embeddings,
            methods=["POST"],
            summary="Create embeddings (OpenAI-compatible)",
            openapi_extra=EMBED_SCHEMA,
            response_class=Response,
        )
        r.add_api_route(
            "/v1/models",
            self.models,
            methods=["GET"],
            summary="List the model aliases",
            response_class=Response,
        )
        r.add_api_route(
            "/v1/models/{model}",
            self.model,
            methods=["GET"],
            summary="One model alias",
            response_class=Response,
        )
        return r


def _refusal(e: KeelError, trace_id: str) -> Response:
    """An error before any upstream call, with the headers clients need to react."""
    resp = error_response(e, trace_id)
    retry_after = getattr(e, "retry_after_s", None)
    if retry_after is not None:
        resp.headers["retry-after"] = str(max(1, int(retry_after + 0.999)))
    if e.type == "insufficient_quota":
        # OpenAI SDKs retry 429s unless told not to; a spent budget will not heal soon.
        resp.headers["x-should-retry"] = "false"
    elif e.status == 503:
        resp.headers["retry-after"] = "5"
    return resp


def _check_key(request: Request, alias: str) -> str | None:
    """The calling key's id, after checking it may use this model (403 otherwise)."""
    principal = getattr(request.state, "keel_principal", None)
    if principal is None:
        return None
    if not principal.allows_model(alias):
        from keel.auth.keys import Forbidden

        allowed = ", ".join(sorted(principal.models or ())) or "none"
        raise Forbidden(f"key '{principal.name}' may not use model '{alias}' (allowed: {allowed})")
    return principal.id


def _upstream_body(dep: Deployment, body: dict[str, Any]) -> dict[str, Any]:
    return {**dep.params, **body, "model": dep.model}


def _common(
    alias: Alias,
    dep: Deployment,
    attribution: Attribution,
    attempts: int,
    tried: list[str] | None = None,
) -> dict[str, Any]:
    if attempts > 1:
        # Which deployments were tried is part of what happened to the call.
        attribution = Attribution(
            attribution.user,
            attribution.feature,
            attribution.session,
            {
                **attribution.tags,
                "_attempts": str(attempts),
                **({"_tried": ",".join(tried)} if tried else {}),
            },
        )
    return {
        "model": alias.name,
        "provider": dep.provider.name,
        "upstream_model": dep.model,
        "attribution": attribution,
        "route_version": alias.route_version,
    }
