"""OTLP spans → ``spans`` rows: decoding (protobuf and OTLP JSON) and mapping.

The kind of a span comes from ``keel.span.kind`` (Keel's SDK), else
``openinference.span.kind``, else ``gen_ai.operation.name``, else a vector
database in ``db.system``; model, tokens, input/output, result count and top
score from the GenAI conventions (``gen_ai.*``) and OpenInference (``llm.*``,
``embedding.*``, ``retrieval.documents.N.*``). Every attribute is kept as JSON.

The protobuf path is the hot one (bench/otlp_ingest.py): one pass over the
attributes builds a plain dict, and the mapping reads it with dict lookups.
"""

from __future__ import annotations

import base64
import math
import re
from typing import Any

import orjson
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from keel.errors import InvalidRequest

MAX_TEXT = 32 * 1024  # input/output kept per span (characters)
_HEX = {16: re.compile(r"[0-9a-f]{16}"), 32: re.compile(r"[0-9a-f]{32}")}
_INT32 = 2**31

KNOWN_KINDS = frozenset(
    "llm embedding retrieval vector-db reranker tool chain agent guardrail evaluator prompt"
    " other".split()
)
RETRIEVAL_KINDS = frozenset({"retrieval", "vector-db"})
# OpenInference span kinds are upper-case Keel kinds, but for RETRIEVER.
_OI_KINDS = {k.upper(): k for k in KNOWN_KINDS} | {"RETRIEVER": "retrieval"}
_GENAI_OPS = {
    "chat": "llm",
    "text_completion": "llm",
    "generate_content": "llm",
    "embeddings": "embedding",
    "execute_tool": "tool",
    "create_agent": "agent",
    "invoke_agent": "agent",
}
VECTOR_DBS = frozenset(
    "qdrant chroma chromadb pgvector milvus zilliz weaviate pinecone lancedb faiss vespa marqo"
    " turbopuffer".split()
)
# General stores that are vector stores only for some operations.
_MAYBE_VECTOR_DBS = frozenset("redis elasticsearch opensearch mongodb postgresql cassandra".split())
_VECTOR_HINTS = ("ft.search", "knn", "vector", "<->", "<=>", "<#>", "similarity")


class _Bad(Exception):
    """A malformed part of an OTLP JSON document (turned into a 400)."""


# -- values -----------------------------------------------------------------

_PB_SCALARS = frozenset({"string_value", "int_value", "double_value", "bool_value"})


def _pb_value(v: Any) -> Any:
    w = v.WhichOneof("value")
    if w in _PB_SCALARS:
        return getattr(v, w)
    if w == "array_value":
        return [_pb_value(x) for x in v.array_value.values]
    if w == "kvlist_value":
        return {kv.key: _pb_value(kv.value) for kv in v.kvlist_value.values}
    if w == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    return None


def _json_value(v: Any) -> Any:
    if not isinstance(v, dict):
        raise _Bad("an attribute value must be an AnyValue object like {'stringValue': 'x'}")
    for k, x in v.items():
        if k in ("stringValue", "string_value"):
            return x if isinstance(x, str) else str(x)
        if k in ("intValue", "int_value"):
            n = int(x)
            if not -(2**63) <= n < 2**63:
                raise _Bad(f"intValue {x} is out of the int64 range")
            return n
        if k in ("doubleValue", "double_value"):
            return float(x)
        if k in ("boolValue", "bool_value"):
            return x if isinstance(x, bool) else str(x).lower() == "true"
        if k in ("arrayValue", "array_value"):
            return [_json_value(i) for i in (x or {}).get("values") or ()]
        if k in ("kvlistValue", "kvlist_value"):
            return _json_attrs((x or {}).get("values"))
        if k in ("bytesValue", "bytes_value"):
            return x
    return None


def _json_attrs(kvs: Any) -> dict[str, Any]:
    if not kvs:
        return {}
    if not isinstance(kvs, list):
        raise _Bad("'attributes' must be an array of {key, value}")
    out: dict[str, Any] = {}
    for kv in kvs:
        if not isinstance(kv, dict) or not isinstance(kv.get("key"), str):
            raise _Bad("an attribute must be an object with a string 'key'")
        val = kv.get("value")
        out[kv["key"]] = None if val is None else _json_value(val)
    return out


def _jget(d: dict[str, Any], camel: str, snake: str) -> Any:
    v = d.get(camel)
    return d.get(snake) if v is None else v


def _json_id(v: Any, nbytes: int, what: str) -> str | None:
    """OTLP JSON ids are hex; base64 (the generic protobuf JSON mapping) is accepted too."""
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise _Bad(f"{what} must be a hex string")
    s = v.lower()
    if len(s) == 2 * nbytes and _HEX[2 * nbytes].fullmatch(s):
        return None if s.count("0") == len(s) else s
    try:
        raw = base64.b64decode(v, validate=True)
    except ValueError:
        raw = b""
    if len(raw) != nbytes:
        raise _Bad(f"{what} must be {2 * nbytes} hex characters; got {v[:80]!r}")
    return None if raw.count(0) == nbytes else raw.hex()


def _nanos(v: Any) -> int:
    if v is None or v == "":
        return 0
    try:
        n = int(v)
    except (TypeError, ValueError):
        n = -1
    if not 0 <= n < 2**64:
        raise _Bad(f"a time must be integer nanoseconds (uint64); got {str(v)[:80]!r}")
    return n


# -- mapping ----------------------------------------------------------------


def span_kind(attrs: dict[str, Any]) -> str:
    """Keel's kind of a span, from its attributes (see the module docstring)."""
    g = attrs.get
    k = g("keel.span.kind")
    if k is not None:
        return str(k).strip().lower().replace("_", "-")[:32] or "other"
    k = g("openinference.span.kind")
    if k is not None:
        s = str(k).strip()
        return _OI_KINDS.get(s.upper()) or s.lower()[:32] or "other"
    op = g("gen_ai.operation.name")
    if op is not None and (mapped := _GENAI_OPS.get(str(op).lower())):
        return mapped
    db = g("db.system")
    if db is None:
        db = g("db.system.name")
    if db is not None:
        d = str(db).lower()
        if d in VECTOR_DBS:
            return "vector-db"
        if d in _MAYBE_VECTOR_DBS:
            for key in ("db.operation", "db.operation.name", "db.query.text", "db.statement"):
                text = g(key)
                if text is not None and any(h in str(text).lower() for h in _VECTOR_HINTS):
                    return "vector-db"
    if op is not None or g("gen_ai.request.model") is not None or g("llm.model_name") is not None:
        return "llm"
    return "other"


def _text(v: Any) -> str | None:
    if v is None:
        return None
    s = v if isinstance(v, str) else orjson.dumps(v, default=str).decode()
    if len(s) > MAX_TEXT:
        s = s[:MAX_TEXT] + "…[truncated]"
    return s.replace("\x00", "") if "\x00" in s else s


def _short(v: Any, n: int) -> str | None:
    if v is None:
        return None
    s = str(v)[:n]
    return s.replace("\x00", "") if "\x00" in s else s


def _int(v: Any) -> int | None:
    if v is None or isinstance(v, bool):
        return None
    if not isinstance(v, int):
        try:
            v = int(float(v))
        except (TypeError, ValueError, OverflowError):
            return None
    return v if -_INT32 <= v < _INT32 else None


def _float(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _indexed(attrs: dict[str, Any], prefix: str, strip: str = "") -> dict[int, dict[str, Any]]:
    """``prefix.N.field`` attributes → {N: {field: value}} (flattened lists)."""
    out: dict[int, dict[str, Any]] = {}
    n = len(prefix)
    for k, v in attrs.items():
        if not k.startswith(prefix):
            continue
        idx, _, field = k[n:].partition(".")
        if not idx.isdigit() or not field:
            continue
        if strip and field.startswith(strip):
            field = field[len(strip) :]
        out.setdefault(int(idx), {})[field] = v
    return out


def _messages(attrs: dict[str, Any], blob: str, prefix: str, strip: str = "") -> Any:
    if prefix not in blob:
        return None
    items = _indexed(attrs, prefix, strip)
    return [items[i] for i in sorted(items)] or None


def _from_events(events: list[dict[str, Any]] | None, name: str, key: str) -> Any:
    for e in events or ():
        if e["name"] == name and (v := e["attributes"].get(key)) is not None:
            return v
    return None


def map_span(
    trace_id: str,
    span_id: str,
    parent: str | None,
    name: str,
    start_ns: int,
    end_ns: int,
    code: int,
    message: str,
    attrs: dict[str, Any],
    events: list[dict[str, Any]] | None,
    service: str | None,
) -> dict[str, Any]:
    """One OTLP span (already decoded) → one ``spans`` row."""
    g = attrs.get
    kind = span_kind(attrs)
    inp = g("input.value")
    if inp is None:
        inp = g("gen_ai.prompt")
        if inp is None:
            inp = g("gen_ai.input.messages")
    out = g("output.value")
    if out is None:
        out = g("gen_ai.completion")
        if out is None:
            out = g("gen_ai.output.messages")
    result_count = _int(g("keel.result_count"))
    top_score = _float(g("keel.top_score"))
    retrieval = kind in RETRIEVAL_KINDS or kind == "reranker"
    if inp is None or out is None or retrieval:
        blob = "\n".join(attrs)  # one C-level join, then substring tests, per span
        if inp is None:
            inp = _messages(attrs, blob, "gen_ai.prompt.") or _messages(
                attrs, blob, "llm.input_messages.", "message."
            )
            if inp is None and events:
                inp = _from_events(events, "gen_ai.content.prompt", "gen_ai.prompt")
        if out is None:
            out = _messages(attrs, blob, "gen_ai.completion.") or _messages(
                attrs, blob, "llm.output_messages.", "message."
            )
            if out is None and events:
                out = _from_events(events, "gen_ai.content.completion", "gen_ai.completion")
        if "retrieval.documents." in blob and (result_count is None or top_score is None):
            docs = _indexed(attrs, "retrieval.documents.")
            if result_count is None:
                result_count = len(docs)
            if top_score is None:
                scores = [
                    s for d in docs.values() if (s := _float(d.get("document.score"))) is not None
                ]
                top_score = max(scores) if scores else None
        if result_count is None and retrieval:
            result_count = _int(g("db.response.returned_rows"))
    model = g("gen_ai.request.model")
    if model is None:
        model = g("gen_ai.response.model")
        if model is None:
            model = g("llm.model_name")
            if model is None:
                model = g("embedding.model_name")
    pt = g("gen_ai.usage.input_tokens")
    if pt is None:
        pt = g("gen_ai.usage.prompt_tokens")
        if pt is None:
            pt = g("llm.token_count.prompt")
    ct = g("gen_ai.usage.output_tokens")
    if ct is None:
        ct = g("gen_ai.usage.completion_tokens")
        if ct is None:
            ct = g("llm.token_count.completion")
    status = "error" if code == 2 else "ok" if code == 1 else "unset"
    if status == "error" and not message and events:
        exc = _from_events(events, "exception", "exception.message")
        typ = _from_events(events, "exception", "exception.type")
        message = f"{typ}: {exc}" if typ and exc else str(exc or typ or "")
    if end_ns < start_ns:
        end_ns = start_ns
    return {
        "trace_id": trace_id,
        "span_id": span_id,
        "parent_span_id": parent,
        "name": _short(name, 300) or "(unnamed)",
        "kind": kind,
        "service": _short(service, 200),
        "start_us": start_ns // 1000,
        "end_us": end_ns // 1000,
        "duration_ms": (end_ns - start_ns) / 1e6,
        "status": status,
        "status_message": _text(message or None),
        "model": _short(model, 200),
        "prompt_tokens": _int(pt),
        "completion_tokens": _int(ct),
        "input": _text(inp),
        "output": _text(out),
        "result_count": result_count,
        "top_score": top_score,
        "attributes": orjson.dumps(attrs, default=str).decode() if attrs else None,
        "events": orjson.dumps(events, default=str).decode() if events else None,
    }


# -- decoding ---------------------------------------------------------------

_Z16 = bytes(16)
_Z8 = bytes(8)


def decode_protobuf(body: bytes) -> list[dict[str, Any]]:
    req = ExportTraceServiceRequest()
    try:
        req.ParseFromString(body)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise InvalidRequest(
            f"the body is not a protobuf ExportTraceServiceRequest: {e}", code="otlp_decode_error"
        ) from None
    rows: list[dict[str, Any]] = []
    append = rows.append
    pbv = _pb_value
    scalars = _PB_SCALARS
    for ri, rs in enumerate(req.resource_spans):
        service = None
        for kv in rs.resource.attributes:
            if kv.key == "service.name":
                service = pbv(kv.value)
        for si, ss in enumerate(rs.scope_spans):
            for i, sp in enumerate(ss.spans):
                tid, sid, par = sp.trace_id, sp.span_id, sp.parent_span_id
                if len(tid) != 16 or tid == _Z16 or len(sid) != 8 or sid == _Z8:
                    raise InvalidRequest(
                        f"resource_spans[{ri}].scope_spans[{si}].spans[{i}]: trace_id must be "
                        f"16 bytes and span_id 8 bytes, both non-zero (got {len(tid)} and "
                        f"{len(sid)} bytes)",
                        code="otlp_invalid_id",
                    )
                if par and len(par) != 8:
                    raise InvalidRequest(
                        f"resource_spans[{ri}].scope_spans[{si}].spans[{i}]: parent_span_id "
                        f"must be 8 bytes (got {len(par)})",
                        code="otlp_invalid_id",
                    )
                attrs = {}
                for kv in sp.attributes:
                    v = kv.value
                    w = v.WhichOneof("value")
                    attrs[kv.key] = getattr(v, w) if w in scalars else pbv(v)
                events = (
                    [
                        {
                            "name": e.name,
                            "time_us": e.time_unix_nano // 1000,
                            "attributes": {kv.key: pbv(kv.value) for kv in e.attributes},
                        }
                        for e in sp.events
                    ]
                    if len(sp.events)
                    else None
                )
                st = sp.status
                append(
                    map_span(
                        tid.hex(),
                        sid.hex(),
                        par.hex() if par and par != _Z8 else None,
                        sp.name,
                        sp.start_time_unix_nano,
                        sp.end_time_unix_nano,
                        st.code,
                        st.message,
                        attrs,
                        events,
                        service,
                    )
                )
    return rows


_STATUS_NAMES = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}


def _status_code(v: Any) -> int:
    if v is None:
        return 0
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        if v.isdigit():
            return int(v)
        if v.upper() in _STATUS_NAMES:
            return _STATUS_NAMES[v.upper()]
    raise _Bad(f"status.code must be 0, 1, 2 or a STATUS_CODE_* name; got {v!r}")


def _list(d: dict[str, Any], camel: str, snake: str, where: str) -> list[Any]:
    v = _jget(d, camel, snake)
    if v is None:
        return []
    if not isinstance(v, list):
        raise _Bad(f"{where}{camel} must be an array")
    return v


def decode_json(body: bytes) -> list[dict[str, Any]]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"the body is not valid JSON: {e}", code="otlp_decode_error") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("the body must be an OTLP JSON object with 'resourceSpans'")
    rows: list[dict[str, Any]] = []
    where = ""
    try:
        for ri, rs in enumerate(_list(doc, "resourceSpans", "resource_spans", "")):
            where = f"resourceSpans[{ri}]."
            if not isinstance(rs, dict):
                raise _Bad("must be an object")
            res = rs.get("resource") or {}
            service = _json_attrs(res.get("attributes") if isinstance(res, dict) else None).get(
                "service.name"
            )
            scopes = _list(rs, "scopeSpans", "scope_spans", where) or _list(
                rs, "instrumentationLibrarySpans", "instrumentation_library_spans", where
            )
            for si, ss in enumerate(scopes):
                where = f"resourceSpans[{ri}].scopeSpans[{si}]."
                if not isinstance(ss, dict):
                    raise _Bad("must be an object")
                for i, sp in enumerate(_list(ss, "spans", "spans", where)):
                    where = f"resourceSpans[{ri}].scopeSpans[{si}].spans[{i}]: "
                    rows.append(_json_span(sp, service))
    except _Bad as e:
        raise InvalidRequest(f"{where}{e}", code="otlp_invalid_span") from None
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidRequest(f"{where}invalid value: {e}", code="otlp_invalid_span") from None
    return rows


def _json_span(sp: Any, service: Any) -> dict[str, Any]:
    if not isinstance(sp, dict):
        raise _Bad("a span must be an object")
    tid = _json_id(_jget(sp, "traceId", "trace_id"), 16, "traceId")
    sid = _json_id(_jget(sp, "spanId", "span_id"), 8, "spanId")
    if tid is None or sid is None:
        raise _Bad("traceId and spanId are required and must not be all zeros")
    parent = _json_id(_jget(sp, "parentSpanId", "parent_span_id"), 8, "parentSpanId")
    events = []
    for e in _list(sp, "events", "events", ""):
        if not isinstance(e, dict):
            raise _Bad("an event must be an object")
        events.append(
            {
                "name": str(e.get("name") or ""),
                "time_us": _nanos(_jget(e, "timeUnixNano", "time_unix_nano")) // 1000,
                "attributes": _json_attrs(e.get("attributes")),
            }
        )
    st = sp.get("status") or {}
    if not isinstance(st, dict):
        raise _Bad("status must be an object")
    name = sp.get("name")
    return map_span(
        tid,
        sid,
        parent,
        name if isinstance(name, str) else str(name or ""),
        _nanos(_jget(sp, "startTimeUnixNano", "start_time_unix_nano")),
        _nanos(_jget(sp, "endTimeUnixNano", "end_time_unix_nano")),
        _status_code(st.get("code")),
        str(st.get("message") or ""),
        _json_attrs(sp.get("attributes")),
        events or None,
        service if service is None else str(service),
    )
