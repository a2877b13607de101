"""Preprocessing steps: small registered classes, composed into a streaming pipeline.

Each step validates its parameters (pydantic, ``extra="forbid"``) and turns a
stream of canonical rows into another. :func:`prepare` runs them over a stored
version and writes the result as a new version whose lineage is the parent id
and every step with its full parameters (defaults included), so the same steps
over the same input give the same rows, hence the same version id.

A step receives a *factory* of its input stream, not the stream: most call it
once, a two-pass step (a stratified split) calls it twice, which re-reads the
parent and re-runs the (deterministic) steps before it instead of holding rows
in memory.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from keel.data.io import DatasetError, row_text
from keel.data.versions import DatasetStore, VersionInfo

Rows = Iterator[dict[str, Any]]
Source = Callable[[], Rows]


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Step:
    """One preprocessing step. Subclasses set ``name``, ``Params`` and ``apply``."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params

    def __init__(self, kind: str, params: Params) -> None:
        self.kind = kind
        self.params = params

    def apply(self, source: Source) -> Rows:
        raise NotImplementedError


STEPS: dict[str, type[Step]] = {}


def register(cls: type[Step]) -> type[Step]:
    STEPS[cls.name] = cls
    return cls


# -- text fields ----------------------------------------------------------------


def map_text(row: dict[str, Any], kind: str, fn: Callable[[str], str]) -> dict[str, Any]:
    """A copy of ``row`` with ``fn`` applied to every text field of its kind (not metadata)."""
    out = dict(row)
    if kind == "chat":
        msgs = []
        for m in row.get("messages") or []:
            if isinstance(m, dict):
                m = dict(m)
                c = m.get("content")
                if isinstance(c, str):
                    m["content"] = fn(c)
                elif isinstance(c, list):  # content parts: [{"type": "text", "text": …}]
                    m["content"] = [
                        {**p, "text": fn(p["text"])}
                        if isinstance(p, dict) and isinstance(p.get("text"), str)
                        else p
                        for p in c
                    ]
            msgs.append(m)
        out["messages"] = msgs
    else:
        fields = ("prompt", "completion") if kind == "completion" else ("input", "expected")
        for f in fields:
            out[f] = _map_json(row.get(f), fn)
    return out


def _map_json(v: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(v, str):
        return fn(v)
    if isinstance(v, dict):
        return {k: _map_json(x, fn) for k, x in v.items()}
    if isinstance(v, list):
        return [_map_json(x, fn) for x in v]
    return v


def text_length(row: dict[str, Any], kind: str) -> int:
    """Characters in the text fields of a row."""
    total = 0

    def count(s: str) -> str:
        nonlocal total
        total += len(s)
        return s

    map_text(row, kind, count)
    return total


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


# -- steps ----------------------------------------------------------------------

_HSPACE = re.compile(r"[^\S\n]+")
_TRAILING = re.compile(r" +\n")
_BLANKS = re.compile(r"\n{3,}")


class NormalizeParams(Params):
    form: Literal["NFC", "NFKC"] = Field("NFC", description="Unicode normalisation form.")
    whitespace: bool = Field(
        True,
        description="Collapse runs of spaces/tabs to one space, CRLF to LF, 3+ newlines to 2, "
        "and strip the ends.",
    )


@register
class Normalize(Step):
    """Unicode normalisation and whitespace clean-up of every text field."""

    name = "normalize"
    Params = NormalizeParams

    def apply(self, source: Source) -> Rows:
        p: NormalizeParams = self.params  # type: ignore[assignment]

        def clean(s: str) -> str:
            s = unicodedata.normalize(p.form, s)
            if p.whitespace:
                s = s.replace("\r\n", "\n").replace("\r", "\n")
                s = _BLANKS.sub("\n\n", _TRAILING.sub("\n", _HSPACE.sub(" ", s))).strip()
            return s

        for row in source():
            yield map_text(row, self.kind, clean)


class DedupeParams(Params):
    ignore_metadata: bool = Field(
        True, description="Compare content only (rows from traces differ by their metadata)."
    )


@register
class Dedupe(Step):
    """Exact duplicates by canonical content; the first is kept. 16 bytes per unique row."""

    name = "dedupe"
    Params = DedupeParams

    def apply(self, source: Source) -> Rows:
        ignore = self.params.ignore_metadata  # type: ignore[attr-defined]
        seen: set[bytes] = set()
        for row in source():
            key = {k: v for k, v in row.items() if k != "metadata"} if ignore else row
            d = _digest(row_text(key))
            if d not in seen:
                seen.add(d)
                yield row


class RedactParams(Params):
    patterns: dict[str, str] = Field(
        default_factory=dict, description="Extra named regexes, as in redaction.patterns."
    )
    metadata: bool = Field(True, description="Redact metadata values too.")


@register
class Redact(Step):
    """PII (e-mail, phone, card, IBAN, IP, custom) → ``[REDACTED:KIND]`` (the gateway redactor)."""

    name = "redact"
    Params = RedactParams

    def apply(self, source: Source) -> Rows:
        from keel.gateway.redact import Redactor

        p: RedactParams = self.params  # type: ignore[assignment]
        red = Redactor(p.patterns or None)
        for row in source():
            skip = ("split",) if p.metadata else ("split", "metadata")
            body = {k: v for k, v in row.items() if k not in skip}
            clean, _ = red.redact_obj(body)
            yield {**row, **clean}


class FilterLengthParams(Params):
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=0)
    min_tokens: int | None = Field(None, ge=0, description="Approximate: characters / 4.")
    max_tokens: int | None = Field(None, ge=0, description="Approximate: characters / 4.")

    @model_validator(mode="after")
    def _some(self) -> FilterLengthParams:
        if all(v is None for v in self.model_dump().values()):
            raise ValueError("set at least one of min_chars, max_chars, min_tokens, max_tokens")
        return self


@register
class FilterLength(Step):
    """Keep rows whose text fields total within the character / approximate token bounds."""

    name = "filter_length"
    Params = FilterLengthParams

    def apply(self, source: Source) -> Rows:
        p: FilterLengthParams = self.params  # type: ignore[assignment]
        for row in source():
            n = text_length(row, self.kind)
            tokens = math.ceil(n / 4)
            if p.min_chars is not None and n < p.min_chars:
                continue
            if p.max_chars is not None and n > p.max_chars:
                continue
            if p.min_tokens is not None and tokens < p.min_tokens:
                continue
            if p.max_tokens is not None and tokens > p.max_tokens:
                continue
            yield row


class SplitParams(Params):
    train: float = Field(0.8, ge=0, le=1)
    validation: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)
    seed: int = 0
    stratify_by: str | None = Field(
        None, description="A metadata key: each of its values is split in the same proportions."
    )

    @model_validator(mode="after")
    def _sum(self) -> SplitParams:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test must be 1, not {total:g}")
        return self


@register
class Split(Step):
    """Deterministic train/validation/test split, by a seeded hash of each row's content.

    Without ``stratify_by`` each row's split depends only on (seed, row), so it
    is stable when other rows change; proportions are met on average. With it,
    rows of each stratum are ranked by that hash and cut at the fractions, so
    every stratum gets the proportions exactly (two passes over the input).
    """

    name = "split"
    Params = SplitParams
    NAMES = ("train", "validation", "test")

    def _u(self, row: dict[str, Any]) -> float:
        seed = str(self.params.seed).encode()  # type: ignore[attr-defined]
        d = hashlib.blake2b(row_text(row), digest_size=8, key=seed[:64]).digest()
        return int.from_bytes(d, "big") / 2.0**64

    def _pick(self, u: float) -> str:
        p: SplitParams = self.params  # type: ignore[assignment]
        edge = 0.0
        for name, frac in zip(self.NAMES, (p.train, p.validation, p.test), strict=True):
            edge += frac
            if u < edge and frac > 0:
                return name
        return next(n for n, f in zip(self.NAMES, (p.train, p.validation, p.test), strict=True)
                    if f > 0)  # fmt: skip

    def _stratum(self, row: dict[str, Any]) -> str:
        meta = row.get("metadata") or {}
        v = meta.get(self.params.stratify_by) if isinstance(meta, dict) else None  # type: ignore[attr-defined]
        return orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()

    def apply(self, source: Source) -> Rows:
        if self.params.stratify_by is None:  # type: ignore[attr-defined]
            for row in source():
                yield {**row, "split": self._pick(self._u(row))}
            return
        ranks: dict[str, array] = {}
        for row in source():
            ranks.setdefault(self._stratum(row), array("d")).append(self._u(row))
        for a in ranks.values():
            a[:] = array("d", sorted(a))
        for row in source():
            a = ranks[self._stratum(row)]
            # The midpoint of its rank: strata of n rows get round(n * fraction).
            pos = (bisect_left(a, self._u(row)) + 0.5) / len(a)
            yield {**row, "split": self._pick(pos)}


# -- pipeline -------------------------------------------------------------------


def _scalar(v: str) -> Any:
    low = v.strip().lower()
    if low in ("none", "null"):
        return None
    return v.strip()  # pydantic's lax mode turns "0.8", "42", "true" into numbers/bools


def parse_step(spec: str | dict[str, Any]) -> dict[str, Any]:
    """``"split:train=0.8,seed=42"``, ``{"step": "split", "params": {…}}`` or ``{"split": {…}}``."""
    if isinstance(spec, str):
        name, _, rest = spec.partition(":")
        params: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in rest.split(","))):
            k, sep, v = part.partition("=")
            if not sep:
                raise DatasetError(f"step {name!r}: parameters are key=value, not {part!r}")
            params[k.strip()] = _scalar(v)
        return {"step": name.strip(), "params": params}
    if isinstance(spec, dict):
        if "step" in spec:
            extra = set(spec) - {"step", "params"}
            if extra:
                raise DatasetError(f"step {spec['step']!r}: unknown keys {sorted(extra)}")
            return {"step": spec["step"], "params": dict(spec.get("params") or {})}
        if len(spec) == 1:
            ((name, params_),) = spec.items()
            return {"step": name, "params": dict(params_ or {})}
    raise DatasetError(f"a step is 'name[:k=v,…]' or {{step: name, params: {{…}}}}, not {spec!r}")


def build_steps(kind: str, specs: list[str | dict[str, Any]]) -> list[Step]:
    """Parse and validate step specs into step objects (errors name the step and field)."""
    out = []
    for i, spec in enumerate(specs, 1):
        s = parse_step(spec)
        cls = STEPS.get(s["step"])
        if cls is None:
            raise DatasetError(
                f"step {i}: unknown step {s['step']!r}; use one of {', '.join(sorted(STEPS))}"
            )
        try:
            params = cls.Params(**s["params"])
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            where = f" {loc}:" if loc else ""
            raise DatasetError(f"step {i} ({cls.name}):{where} {first['msg']}") from None
        out.append(cls(kind, params))
    return out


def run_steps(source: Source, steps: list[Step]) -> Rows:
    """The rows of ``source`` through every step, lazily."""
    for step in steps:
        source = (lambda st, src: lambda: st.apply(src))(step, source)
    return source()


def prepare(
    store: DatasetStore,
    ref: str | VersionInfo,
    steps: list[str | dict[str, Any]],
    *,
    created_by: str | None = None,
    progress: bool | None = None,
) -> VersionInfo:
    """Run ``steps`` over version ``ref`` into a new version of the same dataset."""
    parent = store.get(ref)
    if not steps:
        raise DatasetError("prepare needs at least one step")
    built = build_steps(parent.kind, steps)
    recorded = [{"step": s.name, "params": s.params.model_dump()} for s in built]
    rows = run_steps(lambda: store.read_rows(parent), built)
    return store.write_version(
        parent.dataset,
        parent.kind,
        rows,
        parent_id=parent.id,
        steps=recorded,
        source={"type": "prepare", "from": parent.id},
        created_by=created_by,
        progress=progress,
    )
