"""Keel's Python SDK: trace an application with OpenTelemetry and send the spans to Keel.

    import keel

    keel.init(endpoint="http://127.0.0.1:4000", service_name="my-app")

    @keel.observe(kind="retrieval")
    def search(query: str) -> list[str]: ...

    with keel.span("answer", kind="chain", input=q) as s:
        docs = search(q)
        s.set_output(answer)

Spans are OpenTelemetry spans, exported in batches over OTLP/HTTP (protobuf) to
Keel's ``POST /v1/traces``; the kind goes in ``keel.span.kind``, inputs and
outputs in ``input.value`` / ``output.value`` (OpenInference names).
Calls through Keel's gateway join the trace when their HTTP client sends a
``traceparent`` header: ``httpx.Client(event_hooks={"request": [keel.inject_traceparent]})``.

Instrumenting never breaks the host: an error inside the SDK is logged and
ignored, the host's own exceptions are recorded and re-raised unchanged.
Without :func:`init` the decorators use whatever global OpenTelemetry tracer
provider the application configured (none: they cost about a microsecond).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, overload

from opentelemetry import trace as _trace

from keel import _sdk_fast as _fast

# The serialisation helpers and span internals live in keel._sdk_spans; the names
# other code (and tests) reach through keel.sdk are re-exported here.
from keel._sdk_spans import (  # noqa: F401
    KIND,
    MAX_CHARS,
    MAX_DOCS,
    F,
    SpanHandle,
    _attr,
    _default,
    _dump,
    _end,
    _FollowingTracer,
    _FollowingTracerProvider,
    _recording,
    _SpanScope,
    _start_span,
    _State,
    _state,
    _wrap,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("keel.sdk")

_lock = threading.Lock()


# -- set-up -----------------------------------------------------------------


def init(
    endpoint: str = "http://127.0.0.1:4000",
    *,
    service_name: str | None = None,
    headers: Mapping[str, str] | None = None,
    batch: bool = True,
    exporter: SpanExporter | None = None,
    timeout_s: float = 5.0,
    set_global: bool = True,
    fast: bool = True,
    queue_size: int = 8192,
) -> TracerProvider:
    """Send this process's spans to Keel at ``endpoint`` (its root URL).

    Configures an OpenTelemetry ``TracerProvider`` with a ``BatchSpanProcessor``
    (``batch=False``: export each span as it ends) around an ``OTLPSpanExporter``
    posting protobuf to ``<endpoint>/v1/traces`` with ``headers`` (an API key).
    ``exporter`` replaces that exporter (tests, other backends).

    Calling it again with the same arguments returns the same provider; with
    other arguments the previous provider is flushed and shut down. With
    ``set_global`` the OpenTelemetry global provider follows Keel's (unless the
    application already set its own), so other instrumentations (FastAPI's,
    httpx's, …) export here too; ``set_global=False`` keeps them out. Do not
    set it in a process that also runs Keel's server: the server's own request
    spans would be exported to itself, endlessly.

    Spans wait in a queue of ``queue_size``; when Keel cannot keep up the oldest
    are dropped (never blocking the application), with one warning per minute.

    ``fast`` (default) keeps the cost per span low: Keel's own spans skip the
    SDK's generic span machinery (:mod:`keel._sdk_fast`) and the exporter
    encodes protobuf directly. ``fast=False`` is stock OpenTelemetry end to end
    (about twice the cost per span, bench/sdk_overhead.py).

    Raises only on invalid arguments (e.g. ``queue_size=0``); once set up,
    nothing the SDK does raises into the application.
    """
    key = (
        endpoint,
        service_name,
        tuple(sorted((headers or {}).items())),
        batch,
        id(exporter),
        timeout_s,
        set_global,
        fast,
        queue_size,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    with _lock:
        if _state.provider is not None and _state.key == key:
            return _state.provider
        if exporter is None:
            cls = _fast.exporter_class() if fast else None
            if cls is None:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter as cls,
                )
            exporter = cls(
                endpoint=endpoint.rstrip("/") + "/v1/traces",
                headers=dict(headers or {}),
                timeout=timeout_s,
            )
        resource = Resource.create({"service.name": service_name or _default_service()})
        provider = TracerProvider(resource=resource)
        processor = (
            BatchSpanProcessor(
                exporter,
                max_queue_size=queue_size,
                schedule_delay_millis=1000,
                max_export_batch_size=512,
            )
            if batch
            else SimpleSpanProcessor(exporter)
        )
        provider.add_span_processor(processor)
        _quiet_queue_full()
        old, _state.provider = _state.provider, provider
        _state.tracer = provider.get_tracer("keel.sdk")
        _state.fast = _fast.fast_path(provider, processor) if fast else None
        _state.key = key
        _state.generation += 1
        _state.global_on = set_global
        if set_global:
            _install_global()
    if old is not None:
        _close(old)
    return provider


def flush(timeout_s: float = 10.0) -> bool:
    """Export the spans ended so far; True when done within ``timeout_s``."""
    p = _state.provider
    if p is None:
        return True
    try:
        return bool(p.force_flush(int(timeout_s * 1000)))
    except Exception:
        log.warning("keel: flushing spans failed", exc_info=True)
        return False


def shutdown() -> None:
    """Flush and stop the provider :func:`init` configured (idempotent)."""
    with _lock:
        old, _state.provider = _state.provider, None
        _state.tracer = _trace.get_tracer("keel.sdk")
        _state.fast = None
        _state.key = None
        _state.generation += 1
    if old is not None:
        _close(old)


def _close(provider: Any) -> None:
    try:
        provider.shutdown()
    except Exception:
        log.warning("keel: shutting down the tracer provider failed", exc_info=True)


class _OncePerMinute(logging.Filter):
    """Lets a repeated message through once a minute (the SDK warns once per dropped span)."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        key = str(record.msg)
        if now - self.last.get(key, -1e9) < 60:
            return False
        self.last[key] = now
        return True


def _quiet_queue_full() -> None:
    lg = logging.getLogger("opentelemetry.sdk._shared_internal")
    if not any(isinstance(f, _OncePerMinute) for f in lg.filters):
        lg.addFilter(_OncePerMinute())


def _default_service() -> str:
    argv0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return os.path.splitext(argv0)[0] or "python-app"


def _install_global() -> None:
    current = _trace.get_tracer_provider()
    if isinstance(current, _FollowingTracerProvider):
        return
    if isinstance(current, _trace.ProxyTracerProvider):
        _trace.set_tracer_provider(_FollowingTracerProvider())
    else:
        log.info(
            "keel: a global OpenTelemetry tracer provider is already set; Keel's spans are "
            "exported by Keel's own provider, other instrumentation keeps the existing one"
        )


def span(name: str, kind: str = "chain", **attributes: Any) -> _SpanScope:
    """A span around a block, for ``with`` and ``async with``; ``attributes`` are
    recorded on it (non-scalar values as JSON text), ``input=`` and ``output=``
    as the span's input and output."""
    attrs = {KIND: kind}
    for k, v in attributes.items():
        if k in ("input", "output"):
            attrs[f"{k}.value"] = _dump(v)
        else:
            attrs[k] = v
    return _SpanScope(name, attrs)


@overload
def observe(fn: F, /) -> F: ...
@overload
def observe(
    kind: str = "chain",
    *,
    name: str | None = None,
    capture_input: bool = True,
    capture_output: bool = True,
) -> Callable[[F], F]: ...
def observe(
    kind: Any = "chain",
    *,
    name: str | None = None,
    capture_input: bool = True,
    capture_output: bool = True,
) -> Any:
    """Decorate a function (sync or async) so each call is a span of kind ``kind``
    (``chain``, ``retrieval``, ``tool``, ``llm``, ``embedding``, ``agent``, …).

    The arguments (by name) and the return value are recorded as JSON text
    (``capture_input`` / ``capture_output``); an exception is recorded and
    re-raised unchanged. Usable bare (``@observe``) or called (``@observe(...)``).
    For ``retrieval`` and ``vector-db``, a list result also records its length
    and, for ``(doc, score)`` pairs or dicts with ``score``, the best score.
    """
    if callable(kind):
        return _wrap(kind, "chain", name, capture_input, capture_output)
    return lambda fn: _wrap(fn, str(kind), name, capture_input, capture_output)


# -- propagation ------------------------------------------------------------


def trace_headers() -> dict[str, str]:
    """``{"traceparent": …}`` (and ``tracestate``) for the current span; {} outside one."""
    try:
        sc = _trace.get_current_span().get_span_context()
        if not sc.is_valid:
            return {}
        h = {"traceparent": f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"}
        if sc.trace_state:
            h["tracestate"] = sc.trace_state.to_header()
        return h
    except Exception:
        log.debug("keel: trace_headers failed", exc_info=True)
        return {}


def current_trace_id() -> str | None:
    """The current OpenTelemetry trace id (32 hex), None outside a span."""
    sc = _trace.get_current_span().get_span_context()
    return f"{sc.trace_id:032x}" if sc.is_valid else None


class _Done:
    """Returned by :func:`inject_traceparent`: ignored by sync clients, awaitable for
    async ones (httpx awaits the hooks of an ``AsyncClient``)."""

    __slots__ = ()

    def __await__(self) -> Any:
        return iter(())


_DONE = _Done()


def inject_traceparent(request: Any) -> _Done:
    """httpx request hook: add the current span's ``traceparent`` (unless the request
    has one), so a call through Keel's gateway joins the application's trace.

    Works for ``httpx.Client`` and ``httpx.AsyncClient`` (and the openai SDK's
    ``DefaultHttpxClient``): ``event_hooks={"request": [keel.inject_traceparent]}``.
    """
    try:
        if "traceparent" not in request.headers:
            for k, v in trace_headers().items():
                request.headers[k] = v
    except Exception:
        log.debug("keel: inject_traceparent failed", exc_info=True)
    return _DONE


# -- feedback ---------------------------------------------------------------


def feedback(
    trace_id: str,
    *,
    name: str = "user",
    score: float | None = None,
    label: str | None = None,
    comment: str | None = None,
    passed: bool | None = None,
    source: str = "human",
    idempotency_key: str | None = None,
    endpoint: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 5.0,
) -> dict[str, Any] | None:
    """Record a user's or reviewer's rating of a gateway call: ``trace_id`` is the call's
    ``x-keel-trace-id`` response header. Returns the stored score.

    Posts to ``<endpoint>/api/traces/{trace_id}/feedback``; ``endpoint`` and
    ``headers`` (the API key) default to those given to :func:`init`. Sending the
    same ``idempotency_key`` again returns the first score instead of a second one.

    Raises ValueError without a ``score`` or ``label``, and a :class:`keel.errors.KeelError`
    (``InvalidRequest``, ``NotFound``, …) when Keel refuses it. When Keel cannot be
    reached or fails, the feedback is logged as lost and None returned: it never
    breaks the application.
    """
    import httpx

    from keel.errors import InvalidRequest, KeelError, NotFound

    if score is None and label is None:
        raise ValueError("keel.feedback needs a score and/or a label")
    key = _state.key  # (endpoint, service_name, headers, …) as given to init()
    url = (endpoint or (key[0] if key else "http://127.0.0.1:4000")).rstrip("/")
    hdrs = dict(headers if headers is not None else (dict(key[2]) if key else {}))
    body: dict[str, Any] = {"name": name, "source": source}
    for k, v in (
        ("score", score),
        ("label", label),
        ("comment", comment),
        ("passed", passed),
        ("idempotency_key", idempotency_key),
    ):
        if v is not None:
            body[k] = v
    try:
        r = httpx.post(
            f"{url}/api/traces/{trace_id}/feedback", json=body, headers=hdrs, timeout=timeout_s
        )
    except httpx.HTTPError as e:
        log.warning("keel: feedback on trace %s not recorded: %r", trace_id, e)
        return None
    if r.status_code < 300:
        return r.json()
    try:
        msg = r.json()["error"]["message"]
    except Exception:
        msg = r.text[:300] or f"HTTP {r.status_code}"
    if r.status_code >= 500:
        log.warning("keel: feedback on trace %s not recorded: %s", trace_id, msg)
        return None
    cls = {400: InvalidRequest, 404: NotFound}.get(r.status_code)
    if cls is not None:
        raise cls(msg)
    raise KeelError(msg, status=r.status_code)
