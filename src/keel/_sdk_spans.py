"""Internals of :mod:`keel.sdk`: its state, value serialisation, and the span
machinery behind ``keel.span`` and ``@keel.observe``.

Private: the public names are in :mod:`keel.sdk` (which re-exports the ones
other code uses). Importing this module imports OpenTelemetry's API.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from opentelemetry import context as _ctx
from opentelemetry import trace as _trace
from opentelemetry.trace import Status, StatusCode

from keel import _sdk_fast as _fast

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

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


# -- tracer state -----------------------------------------------------------


class _FollowingTracerProvider(_trace.TracerProvider):
    """The global provider Keel installs: its tracers follow each :func:`init`."""

    def get_tracer(self, name: str, version: str | None = None, *args: Any, **kw: Any) -> Any:
        return _FollowingTracer(name, version, args, kw)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        from keel.sdk import flush

        return flush(timeout_millis / 1000)

    def shutdown(self) -> None:
        from keel.sdk import shutdown

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


# -- the decorator ---------------------------------------------------------


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
