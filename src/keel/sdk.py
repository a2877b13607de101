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

import functools
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

import orjson
from opentelemetry import context as _ctx
from opentelemetry import trace as _trace
from opentelemetry.trace import Status, StatusCode

from keel import _sdk_fast as _fast

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("keel.sdk")

F = TypeVar("F", bound=Callable[..., Any])
KIND = "keel.span.kind"
MAX_CHARS = 4096  # of one serialised input or output
MAX_DOCS = 20  # documents detailed by set_result (the count is always exact)
_DUMP_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
_SCALARS = (str, bool, int, float)


class _State:
    def __init__(self) -> None:
        self.provider: TracerProvider | None = None
        self.tracer: Any = _trace.get_tracer("keel.sdk")
        self.fast: _fast.Fast | None = None
        self.key: Any = None
        self.generation = 0
        self.global_on = False


_state = _State()
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


class _FollowingTracerProvider(_trace.TracerProvider):
    """The global provider Keel installs: its tracers follow each :func:`init`."""

    def get_tracer(self, name: str, version: str | None = None, *args: Any, **kw: Any) -> Any:
        return _FollowingTracer(name, version, args, kw)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return flush(timeout_millis / 1000)

    def shutdown(self) -> None:
        shutdown()


class _FollowingTracer(_trace.Tracer):
    def __init__(self, name: str, version: str | None, args: tuple, kw: dict) -> None:
        self._spec = (name, version, args, kw)
        self._gen = -1
        self._real: Any = None

    def _tracer(self) -> Any:
        if self._gen != _state.generation:
            name, version, args, kw = self._spec
            p = _state.provider if _state.global_on else None
            self._real = p.get_tracer(name, version, *args, **kw) if p else _trace.NoOpTracer()
            self._gen = _state.generation
        return self._real

    def start_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._tracer().start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._tracer().start_as_current_span(*args, **kwargs)


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


def _recording() -> bool:
    """Whether spans are recorded (else inputs and outputs are not even serialised)."""
    if _state.provider is not None:
        return True
    current = _trace.get_tracer_provider()
    return not isinstance(current, _trace.ProxyTracerProvider | _FollowingTracerProvider)


def _start_span(name: str, attrs: dict[str, Any]) -> Any:
    fast = _state.fast
    if fast is not None and (sp := _fast.start_span(fast, name, attrs)) is not None:
        return sp
    return _state.tracer.start_span(name, attributes=attrs)


# -- values -----------------------------------------------------------------


def _default(o: Any) -> Any:
    dump = getattr(o, "model_dump", None)  # pydantic models
    if callable(dump):
        return dump()
    if isinstance(o, set | frozenset):
        return list(o)
    try:
        return repr(o)
    except Exception:
        return f"<{type(o).__name__}>"


def _dump(v: Any) -> str:
    """Compact text of a value: itself for a string, else JSON, else repr; clipped."""
    try:
        s = v if isinstance(v, str) else orjson.dumps(v, default=_default, option=_DUMP_OPTS)
        if isinstance(s, bytes):
            s = s.decode()
    except Exception:
        try:
            s = repr(v)
        except Exception:
            s = f"<{type(v).__name__}>"
    return s if len(s) <= MAX_CHARS else s[:MAX_CHARS] + "…"


def _attr(v: Any) -> Any:
    """A value OpenTelemetry accepts as an attribute."""
    if isinstance(v, _SCALARS):
        return v
    if isinstance(v, list | tuple) and v and all(isinstance(x, str) for x in v):
        return list(v)
    return _dump(v)


def _argnames(fn: Callable[..., Any]) -> tuple[tuple[str, ...], int]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return (), 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = tuple(p.name for p in params if p.kind in kinds)
    return names, 1 if names and names[0] in ("self", "cls") else 0


def _inputs(names: tuple[str, ...], skip: int, args: tuple, kwargs: dict) -> str:
    d: dict[str, Any] = dict(zip(names[skip:], args[skip:], strict=False))
    if len(args) > len(names):
        d["*args"] = args[len(names) :]
    if kwargs:
        d.update(kwargs)
    return _dump(d)


def _result_attrs(result: Any) -> dict[str, Any]:
    """Result count (and top score, for ``(doc, score)`` pairs or dicts with 'score')."""
    if not isinstance(result, list | tuple):
        return {}
    out: dict[str, Any] = {"keel.result_count": len(result)}
    scores = []
    for r in result[:1000]:
        s = r.get("score") if isinstance(r, dict) else None
        if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], int | float):
            s = r[1]
        if isinstance(s, int | float) and not isinstance(s, bool):
            scores.append(float(s))
    if scores:
        out["keel.top_score"] = max(scores)
    return out


# -- spans ------------------------------------------------------------------


def _end(sp: Any, token: Any, exc: BaseException | None) -> None:
    try:
        if exc is not None:
            sp.record_exception(exc)
            sp.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:1000]))
    except Exception:
        log.debug("keel: recording an exception failed", exc_info=True)
    try:
        if token is not None:
            _ctx.detach(token)
        sp.end()
    except Exception:
        log.debug("keel: ending a span failed", exc_info=True)


class SpanHandle:
    """What ``with keel.span(...) as s`` gives: setters for the span's data.

    Every method is safe: a failure is logged, never raised.
    """

    __slots__ = ("_span",)

    def __init__(self, span: Any) -> None:
        self._span = span

    def set_attribute(self, key: str, value: Any) -> None:
        try:
            self._span.set_attribute(key, _attr(value))
        except Exception:
            log.debug("keel: set_attribute failed", exc_info=True)

    def set_input(self, value: Any) -> None:
        self.set_attribute("input.value", _dump(value))

    def set_output(self, value: Any) -> None:
        self.set_attribute("output.value", _dump(value))

    def set_result(self, documents: Sequence[Any], scores: Sequence[float] | None = None) -> None:
        """Record what a retrieval returned: count, top score and the first documents
        (OpenInference ``retrieval.documents.N.document.{id,content,score}``)."""
        try:
            attrs: dict[str, Any] = {"keel.result_count": len(documents)}
            best = None
            for i, d in enumerate(documents):
                s = scores[i] if scores is not None and i < len(scores) else None
                content: Any = d
                doc_id = None
                if isinstance(d, Mapping):
                    content = d.get("content", d.get("text", d.get("page_content", d)))
                    doc_id = d.get("id")
                    s = d.get("score") if s is None else s
                elif hasattr(d, "page_content"):  # LangChain documents
                    content = d.page_content
                if s is not None:
                    s = float(s)
                    best = s if best is None or s > best else best
                if i >= MAX_DOCS:
                    continue
                p = f"retrieval.documents.{i}.document."
                attrs[p + "content"] = _dump(content)[:1000]
                if doc_id is not None:
                    attrs[p + "id"] = str(doc_id)
                if s is not None:
                    attrs[p + "score"] = s
            if best is not None:
                attrs["keel.top_score"] = best
            self._span.set_attributes(attrs)
        except Exception:
            log.debug("keel: set_result failed", exc_info=True)

    @property
    def trace_id(self) -> str | None:
        """The OpenTelemetry trace id (32 hex), None when not recording."""
        try:
            sc = self._span.get_span_context()
            return f"{sc.trace_id:032x}" if sc.is_valid else None
        except Exception:
            return None

    @property
    def span_id(self) -> str | None:
        try:
            sc = self._span.get_span_context()
            return f"{sc.span_id:016x}" if sc.is_valid else None
        except Exception:
            return None


class _SpanScope:
    __slots__ = ("_attrs", "_name", "_span", "_token")

    def __init__(self, name: str, attrs: dict[str, Any]) -> None:
        self._name = name
        self._attrs = attrs
        self._span: Any = _trace.INVALID_SPAN
        self._token: Any = None

    def __enter__(self) -> SpanHandle:
        try:
            attrs = {k: _attr(v) for k, v in self._attrs.items()}
            self._span = _start_span(self._name, attrs)
            self._token = _ctx.attach(_trace.set_span_in_context(self._span))
        except Exception:
            log.debug("keel: starting a span failed", exc_info=True)
        return SpanHandle(self._span)

    def __exit__(self, et: Any, exc: BaseException | None, tb: Any) -> bool:
        _end(self._span, self._token, exc)
        return False  # never swallow the host's exception

    async def __aenter__(self) -> SpanHandle:
        return self.__enter__()

    async def __aexit__(self, et: Any, exc: BaseException | None, tb: Any) -> bool:
        return self.__exit__(et, exc, tb)


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


def _wrap(fn: F, kind: str, name: str | None, cap_in: bool, cap_out: bool) -> F:
    span_name = name or getattr(fn, "__qualname__", None) or repr(fn)
    base = {KIND: kind}
    names, skip = _argnames(fn) if cap_in else ((), 0)
    results = kind in ("retrieval", "vector-db")
    # A generator's body runs after the call returns; its span covers the call only.
    cap_out = cap_out and not (inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn))

    def start(args: tuple, kwargs: dict) -> tuple[Any, Any, bool]:
        try:
            rec = _recording()
            attrs = base
            if rec and cap_in and (args or kwargs):
                attrs = {KIND: kind, "input.value": _inputs(names, skip, args, kwargs)}
            sp = _start_span(span_name, attrs)
            return sp, _ctx.attach(_trace.set_span_in_context(sp)), rec
        except Exception:
            log.debug("keel: starting a span failed", exc_info=True)
            return None, None, False

    def finish(sp: Any, token: Any, rec: bool, result: Any) -> None:
        if sp is None:
            return
        if rec and cap_out and result is not None:
            try:
                if results:
                    sp.set_attributes(_result_attrs(result))
                sp.set_attribute("output.value", _dump(result))
            except Exception:
                log.debug("keel: recording an output failed", exc_info=True)
        _end(sp, token, None)

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def awrapper(*args: Any, **kwargs: Any) -> Any:
            sp, token, rec = start(args, kwargs)
            try:
                result = await fn(*args, **kwargs)
            except BaseException as e:
                if sp is not None:
                    _end(sp, token, e)
                raise
            finish(sp, token, rec, result)
            return result

        return awrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sp, token, rec = start(args, kwargs)
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:
            if sp is not None:
                _end(sp, token, e)
            raise
        finish(sp, token, rec, result)
        return result

    return wrapper  # type: ignore[return-value]


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
