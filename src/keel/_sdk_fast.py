"""The SDK's fast path: light spans and a direct OTLP protobuf encoder.

Private to :mod:`keel.sdk`; see ``init(fast=True)``.
"""

from __future__ import annotations

import logging
import struct
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace as _trace
from opentelemetry.trace import Status, StatusCode

log = logging.getLogger("keel.sdk")
_SCALARS = (str, bool, int, float)

# Spans
# -----
#
# The OpenTelemetry SDK spends ~11 µs creating and ending a span (sampler,
# attribute validation, locks, metrics hooks) and its OTLP encoder ~14 µs
# encoding it: more than the whole budget of a decorated call. When init()
# built the provider with the default sampler, Keel's own spans are instead
# `_LightSpan`s: SDK ``ReadableSpan``s that also implement the OpenTelemetry
# ``Span`` API (so code inside can still use ``trace.get_current_span()``),
# created with the provider's id generator, resource and processor, and handed
# to that processor when they end. Spans of other instrumentation, or under a
# parent that is not sampled, take the SDK's normal path.


class Fast:
    __slots__ = ("cls", "ids", "processor", "resource", "scope")

    def __init__(self, cls: Any, ids: Any, processor: Any, resource: Any, scope: Any) -> None:
        self.cls = cls
        self.ids = ids
        self.processor = processor
        self.resource = resource
        self.scope = scope


_MAX_ATTRS = 128
_light_cls: Any = None


def fast_path(provider: Any, processor: Any) -> Fast | None:
    try:
        from opentelemetry.sdk.trace import sampling
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from keel._version import __version__

        if provider.sampler is not sampling.DEFAULT_ON:
            return None  # a sampler from OTEL_TRACES_SAMPLER: let the SDK apply it
        scope = InstrumentationScope("keel.sdk", __version__)
        return Fast(light_span_class(), provider.id_generator, processor, provider.resource, scope)
    except Exception:
        log.debug("keel: fast span path unavailable", exc_info=True)
        return None


def _valid(v: Any) -> Any:
    """An attribute value as OpenTelemetry allows it, or None to drop it."""
    if isinstance(v, _SCALARS):
        return v
    if isinstance(v, list | tuple):
        types = {type(x) for x in v}
        if len(types) <= 1 and (not types or issubclass(types.pop(), _SCALARS)):
            return tuple(v)
    log.debug("keel: attribute value of type %s dropped", type(v).__name__)
    return None


def light_span_class() -> Any:
    global _light_cls
    if _light_cls is not None:
        return _light_cls
    from opentelemetry.sdk.trace import Event, ReadableSpan

    unset = Status(StatusCode.UNSET)

    class _LightSpan(ReadableSpan, _trace.Span):
        def __init__(self, name: str, ctx: Any, parent: Any, attrs: dict, fast: Fast) -> None:
            self._attrs = dict(attrs)
            self._evts: list[Any] = []
            ReadableSpan.__init__(
                self,
                name=name,
                context=ctx,
                parent=parent,
                resource=fast.resource,
                attributes=self._attrs,
                events=self._evts,
                instrumentation_scope=fast.scope,
                start_time=time.time_ns(),
            )
            self._nm = name
            self._st = unset
            self._end_ns: int | None = None
            self._proc = fast.processor

        @property
        def name(self) -> str:
            return self._nm

        @property
        def status(self) -> Status:
            return self._st

        @property
        def end_time(self) -> int | None:
            return self._end_ns

        def set_attribute(self, key: str, value: Any) -> None:
            if self._end_ns is None and (key in self._attrs or len(self._attrs) < _MAX_ATTRS):
                v = _valid(value)
                if v is not None:
                    self._attrs[key] = v

        def set_attributes(self, attributes: Mapping[str, Any]) -> None:
            for k, v in attributes.items():
                self.set_attribute(k, v)

        def add_event(
            self, name: str, attributes: Any = None, timestamp: int | None = None
        ) -> None:
            if self._end_ns is None and len(self._evts) < _MAX_ATTRS:
                clean = {k: v for k, v in (attributes or {}).items() if _valid(v) is not None}
                self._evts.append(Event(name, clean, timestamp or time.time_ns()))

        def update_name(self, name: str) -> None:
            if self._end_ns is None:
                self._nm = name

        def is_recording(self) -> bool:
            return self._end_ns is None

        def set_status(self, status: Any, description: str | None = None) -> None:
            if self._end_ns is not None or self._st.status_code is StatusCode.OK:
                return
            st = status if isinstance(status, Status) else Status(status, description)
            if st.status_code is not StatusCode.UNSET:
                self._st = st

        def record_exception(
            self,
            exception: BaseException,
            attributes: Any = None,
            timestamp: int | None = None,
            escaped: bool = False,
        ) -> None:
            t = type(exception)
            mod = t.__module__
            attrs = {
                "exception.type": f"{mod}.{t.__qualname__}"
                if mod != "builtins"
                else t.__qualname__,
                "exception.message": str(exception),
                "exception.stacktrace": "".join(traceback.format_exception(exception)),
                "exception.escaped": str(escaped),
                **(attributes or {}),
            }
            self.add_event("exception", attrs, timestamp)

        def end(self, end_time: int | None = None) -> None:
            if self._end_ns is None:
                self._end_ns = end_time or time.time_ns()
                self._proc.on_end(self)

    _light_cls = _LightSpan
    return _LightSpan


def start_span(fast: Fast, name: str, attrs: dict[str, Any]) -> Any:
    """A light span under the current span; None when the SDK must decide (the
    parent is not sampled)."""
    parent = _trace.get_current_span().get_span_context()
    if not parent.is_valid:
        ctx = _trace.SpanContext(
            fast.ids.generate_trace_id(), fast.ids.generate_span_id(), False, _ROOT_FLAGS
        )
        return fast.cls(name, ctx, None, attrs, fast)
    if parent.trace_flags.sampled:
        ctx = _trace.SpanContext(
            parent.trace_id,
            fast.ids.generate_span_id(),
            False,
            parent.trace_flags,
            parent.trace_state,
        )
        return fast.cls(name, ctx, parent, attrs, fast)
    return None


_ROOT_FLAGS = _trace.TraceFlags(_trace.TraceFlags.SAMPLED)


# Exporter
# --------
#
# The official OTLPSpanExporter builds one protobuf object per span, attribute
# and value (~14 µs a span). `_encode_request` writes the same bytes directly
# (a test checks they parse to the message the official encoder builds), and
# the exporter subclass sends them with the official HTTP client, retries
# included; any surprise falls back to the official path.

_pack_d = struct.Struct("<d").pack
_pack_q = struct.Struct("<Q").pack
_pack_i = struct.Struct("<I").pack
_M64 = 0xFFFFFFFFFFFFFFFF


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_LEN = [_uvarint(i) for i in range(1 << 12)]
_KEYS: dict[str, bytes] = {}


def _ld(tag: bytes, payload: bytes) -> bytes:
    n = len(payload)
    return tag + (_LEN[n] if n < 4096 else _uvarint(n)) + payload


def _any(v: Any) -> bytes:
    t = type(v)
    if t is str:
        return _ld(b"\x0a", v.encode())
    if t is bool:
        return b"\x10\x01" if v else b"\x10\x00"
    if t is int:
        return b"\x18" + _uvarint(v & _M64)
    if t is float:
        return b"\x21" + _pack_d(v)
    if v is None:
        return b""
    if isinstance(v, bool):
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, str):
        return _ld(b"\x0a", str(v).encode())
    if isinstance(v, int):
        return b"\x18" + _uvarint(int(v) & _M64)
    if isinstance(v, float):
        return b"\x21" + _pack_d(float(v))
    if isinstance(v, bytes):
        return _ld(b"\x3a", v)
    if isinstance(v, Sequence):
        return _ld(b"\x2a", b"".join([_ld(b"\x0a", _any(x)) for x in v]))
    if isinstance(v, Mapping):
        return _ld(b"\x32", b"".join([_ld(b"\x0a", _kv(str(k), x)) for k, x in v.items()]))
    raise TypeError(f"attribute values cannot be {type(v).__name__}")


def _kv(k: str, v: Any) -> bytes:
    kb = _KEYS.get(k)
    if kb is None:
        kb = _ld(b"\x0a", k.encode())
        if len(_KEYS) < 4096:
            _KEYS[k] = kb
    return kb + _ld(b"\x12", _any(v))


def _attrs_pb(tag: bytes, attrs: Any) -> bytes:
    if not attrs:
        return b""
    out = []
    for k, v in attrs.items():
        try:
            out.append(_ld(tag, _kv(k, v)))
        except Exception:  # the official encoder also skips such a value
            log.debug("keel: attribute %r not encodable", k, exc_info=True)
    return b"".join(out)


def _span_pb(s: Any) -> bytes:
    ctx = s.context
    parts = [b"\x0a\x10", ctx.trace_id.to_bytes(16, "big"), b"\x12\x08"]
    parts.append(ctx.span_id.to_bytes(8, "big"))
    if ctx.trace_state:
        parts.append(
            _ld(b"\x1a", ",".join([f"{k}={v}" for k, v in ctx.trace_state.items()]).encode())
        )
    p = s.parent
    if p:
        parts.append(b"\x22\x08" + p.span_id.to_bytes(8, "big"))
    if s.name:
        parts.append(_ld(b"\x2a", s.name.encode()))
    parts.append(b"\x30" + _uvarint(s.kind.value + 1))
    if s.start_time:
        parts.append(b"\x39" + _pack_q(s.start_time))
    if s.end_time:
        parts.append(b"\x41" + _pack_q(s.end_time))
    parts.append(_attrs_pb(b"\x4a", s.attributes))
    if s.dropped_attributes:
        parts.append(b"\x50" + _uvarint(s.dropped_attributes))
    for e in s.events:
        eb = b"\x09" + _pack_q(e.timestamp) if e.timestamp else b""
        if e.name:
            eb += _ld(b"\x12", e.name.encode())
        eb += _attrs_pb(b"\x1a", e.attributes)
        if e.dropped_attributes:
            eb += b"\x20" + _uvarint(e.dropped_attributes)
        parts.append(_ld(b"\x5a", eb))
    if s.dropped_events:
        parts.append(b"\x60" + _uvarint(s.dropped_events))
    for link in s.links:
        c = link.context
        lb = (
            b"\x0a\x10"
            + c.trace_id.to_bytes(16, "big")
            + b"\x12\x08"
            + c.span_id.to_bytes(8, "big")
        )
        lb += _attrs_pb(b"\x22", link.attributes)
        if link.dropped_attributes:
            lb += b"\x28" + _uvarint(link.dropped_attributes)
        parts.append(_ld(b"\x6a", lb + b"\x35" + _pack_i(0x300 if c.is_remote else 0x100)))
    if s.dropped_links:
        parts.append(b"\x70" + _uvarint(s.dropped_links))
    st = s.status
    if st is not None:
        sb = _ld(b"\x12", st.description.encode()) if st.description else b""
        if st.status_code.value:
            sb += b"\x18" + _uvarint(st.status_code.value)
        parts.append(_ld(b"\x7a", sb))
    # flags (field 16, fixed32): "has is_remote" + whether the parent is remote
    parts.append(b"\x85\x01" + _pack_i(0x300 if p is not None and p.is_remote else 0x100))
    return b"".join(parts)


def encode_request(spans: Sequence[Any]) -> bytes:
    """An OTLP ``ExportTraceServiceRequest`` (protobuf bytes) of SDK ``ReadableSpan``s."""
    groups: dict[int, tuple[Any, dict[int, tuple[Any, list[bytes]]]]] = {}
    for s in spans:
        r, sc = s.resource, s.instrumentation_scope
        g = groups.get(id(r))
        if g is None:
            g = groups[id(r)] = (r, {})
        sg = g[1].get(id(sc))
        if sg is None:
            sg = g[1][id(sc)] = (sc, [])
        sg[1].append(_ld(b"\x12", _span_pb(s)))
    out = []
    for r, scopes in groups.values():
        rs = [_ld(b"\x0a", _attrs_pb(b"\x0a", r.attributes))]
        for sc, encoded in scopes.values():
            sb = b""
            if sc is not None:
                sb = _ld(b"\x0a", sc.name.encode()) if sc.name else b""
                sb += _ld(b"\x12", sc.version.encode()) if sc.version else b""
                sb += _attrs_pb(b"\x1a", sc.attributes)
            body = _ld(b"\x0a", sb) + b"".join(encoded)
            if sc is not None and sc.schema_url:
                body += _ld(b"\x1a", sc.schema_url.encode())
            rs.append(_ld(b"\x12", body))
        if r.schema_url:
            rs.append(_ld(b"\x1a", r.schema_url.encode()))
        out.append(_ld(b"\x0a", b"".join(rs)))
    return b"".join(out)


MAX_REQUEST_BYTES = 3 * 1024 * 1024  # under Keel's default gateway.max_body_bytes (4 MiB)
_exporter_cls: Any = None


def exporter_class() -> Any:
    global _exporter_cls
    if _exporter_cls is not None:
        return _exporter_cls
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import SpanExportResult
    except ImportError:  # pragma: no cover - a dependency of Keel
        return None

    class KeelSpanExporter(OTLPSpanExporter):
        """The official OTLP/HTTP exporter with a direct protobuf encoder; a request
        over MAX_REQUEST_BYTES is split so Keel never refuses it as too large."""

        def export(self, spans: Sequence[Any]) -> Any:
            client = getattr(self, "_client", None)
            if getattr(self, "_shutdown", False) or not hasattr(client, "export"):
                return super().export(spans)
            try:
                data = encode_request(spans)
            except Exception:
                log.debug("keel: direct encoding failed; using the official encoder", exc_info=True)
                return super().export(spans)
            if len(data) > MAX_REQUEST_BYTES and len(spans) > 1:
                half = len(spans) // 2
                a, b = self.export(spans[:half]), self.export(spans[half:])
                ok = a is SpanExportResult.SUCCESS and b is SpanExportResult.SUCCESS
                return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE
            result = client.export(data)
            return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE

    _exporter_cls = KeelSpanExporter
    return KeelSpanExporter
