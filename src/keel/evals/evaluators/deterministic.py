"""Deterministic evaluators: no model, no network, microseconds per case.

Each is one small class with an ``Options`` model (``extra="forbid"``). Values
are in [0, 1]; ``passed`` is set (from the check, or from ``threshold`` when the
user gives one); ``details`` say why. A case without the expected answer an
evaluator needs, or without output, scores ``value=None`` with
``details["error"]`` instead of raising.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Literal

from jsonschema import exceptions as js_exceptions
from jsonschema import validators as js_validators
from pydantic import Field, field_validator, model_validator

from keel.evals.base import EvalCase, EvalOptions, Evaluator, Score, register_evaluator
from keel.evals.evaluators._util import (
    binary,
    error_score,
    expected_texts,
    extract_json,
    missing_expected,
    no_output,
)
from keel.evals.refusal import is_refusal

_WS = re.compile(r"\s+")


def _norm(text: str, *, case_sensitive: bool, strip: bool, whitespace: bool) -> str:
    if strip:
        text = text.strip()
    if whitespace:
        text = _WS.sub(" ", text).strip()
    return text if case_sensitive else text.casefold()


# -- text matching ------------------------------------------------------------


class ExactMatchOptions(EvalOptions):
    case_sensitive: bool = Field(True, description="Compare case (False: casefold both).")
    strip: bool = Field(True, description="Ignore leading/trailing whitespace.")
    normalize_whitespace: bool = Field(False, description="Collapse runs of whitespace.")


@register_evaluator
class ExactMatch(Evaluator):
    kind = "exact_match"
    description = "1 when the output equals the expected answer (or one of a list of them)."
    Options = ExactMatchOptions
    requires_expected = True

    async def evaluate(self, case: EvalCase) -> Score:
        if (bad := no_output(case)) is not None:
            return bad
        wanted = expected_texts(case.expected)
        if wanted is None:
            return missing_expected(self.kind)
        o: ExactMatchOptions = self.options  # type: ignore[assignment]
        kw = {
            "case_sensitive": o.case_sensitive,
            "strip": o.strip,
            "whitespace": o.normalize_whitespace,
        }
        out = _norm(case.output or "", **kw)
        hit = next((w for w in wanted if _norm(w, **kw) == out), None)
        details: dict[str, Any] = {"matched": hit} if hit is not None else {"expected": wanted}
        return binary(self, hit is not None, details)


class ContainsOptions(EvalOptions):
    values: list[str] | str | None = Field(
        None, description="Substring(s) to look for (default: the case's expected answer)."
    )
    mode: Literal["all", "any"] = Field("all", description="Need all of them, or any one.")
    case_sensitive: bool = Field(False, description="Match case.")


@register_evaluator
class Contains(Evaluator):
    kind = "contains"
    description = "The output contains the substring(s) (all or any); value = share found."
    Options = ContainsOptions

    async def evaluate(self, case: EvalCase) -> Score:
        if (bad := no_output(case)) is not None:
            return bad
        o: ContainsOptions = self.options  # type: ignore[assignment]
        values = expected_texts(o.values) if o.values is not None else expected_texts(case.expected)
        if values is None:
            return error_score("contains needs 'values' in its options or an expected answer")
        text = case.output or ""
        hay = text if o.case_sensitive else text.casefold()
        found = [v for v in values if (v if o.case_sensitive else v.casefold()) in hay]
        missing = [v for v in values if v not in found]
        ok = bool(found) if o.mode == "any" else not missing
        value = (1.0 if found else 0.0) if o.mode == "any" else len(found) / len(values)
        score = Score(value=value, details={"found": found, "missing": missing, "mode": o.mode})
        if o.threshold is None:
            score.passed = ok
        return self.finish(score)


class RegexOptions(EvalOptions):
    pattern: str = Field(description="A Python regular expression.")
    must_match: bool = Field(True, description="False: pass when the pattern does NOT match.")
    full_match: bool = Field(False, description="The whole output must match (not a search).")
    ignore_case: bool = False
    multiline: bool = False
    dotall: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"invalid regular expression: {e}") from None
        return v


@register_evaluator
class Regex(Evaluator):
    kind = "regex"
    description = "The output matches (or, with must_match false, does not match) a pattern."
    Options = RegexOptions

    def __init__(self, options: RegexOptions, client: Any = None) -> None:  # type: ignore[override]
        super().__init__(options, client)
        flags = (
            (re.IGNORECASE if options.ignore_case else 0)
            | (re.MULTILINE if options.multiline else 0)
            | (re.DOTALL if options.dotall else 0)
        )
        self._rx = re.compile(options.pattern, flags)

    async def evaluate(self, case: EvalCase) -> Score:
        if (bad := no_output(case)) is not None:
            return bad
        o: RegexOptions = self.options  # type: ignore[assignment]
        text = case.output or ""
        m = self._rx.fullmatch(text) if o.full_match else self._rx.search(text)
        ok = (m is not None) == o.must_match
        details: dict[str, Any] = {"pattern": o.pattern, "must_match": o.must_match}
        if m is not None:
            details["match"] = m.group(0)[:200]
        if not ok:
            details["reason"] = (
                "the pattern did not match" if o.must_match else "the pattern matched"
            )
        return binary(self, ok, details)


# -- structure ----------------------------------------------------------------


class JsonValidOptions(EvalOptions):
    extract: bool = Field(
        True, description="Also accept JSON inside ```json fences or surrounded by prose."
    )
    require_object: bool = Field(False, description="The JSON must be an object ({...}).")


@register_evaluator
class JsonValid(Evaluator):
    kind = "json_valid"
    description = "The output is (or contains, in a code fence) valid JSON."
    Options = JsonValidOptions

    async def evaluate(self, case: EvalCase) -> Score:
        if (bad := no_output(case)) is not None:
            return bad
        o: JsonValidOptions = self.options  # type: ignore[assignment]
        value, err = extract_json(case.output or "", o.extract)
        if err is not None:
            return binary(self, False, {"reason": err})
        if o.require_object and not isinstance(value, dict):
            return binary(self, False, {"reason": f"JSON {type(value).__name__}, not an object"})
        return binary(self, True, {"type": type(value).__name__})


def _check_schema(schema: Any) -> Any:
    """The jsonschema validator class for ``schema``; ValueError when the schema is invalid."""
    if not isinstance(schema, dict | bool):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    cls = js_validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except js_exceptions.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise ValueError(
            f"invalid JSON schema{' at ' + where if where else ''}: {e.message}"
        ) from None
    return cls


class JsonSchemaOptions(EvalOptions):
    json_schema: dict[str, Any] | None = Field(
        None,
        alias="schema",
        description="The JSON schema (default: the case's expected answer, when it is one).",
    )
    extract: bool = Field(True, description="Also accept JSON inside ```json fences.")
    max_errors: int = Field(5, ge=1, le=100, description="Errors listed in details.")

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            _check_schema(v)
        return v


@register_evaluator
class JsonSchema(Evaluator):
    kind = "json_schema"
    description = "The output is JSON that conforms to a JSON schema (jsonschema)."
    Options = JsonSchemaOptions

    def __init__(self, options: JsonSchemaOptions, client: Any = None) -> None:  # type: ignore[override]
        super().__init__(options, client)
        s = options.json_schema
        self._validator = _check_schema(s)(s) if s is not None else None

    async def evaluate(self, case: EvalCase) -> Score:
        if (bad := no_output(case)) is not None:
            return bad
        o: JsonSchemaOptions = self.options  # type: ignore[assignment]
        validator = self._validator
        if validator is None:
            schema = case.expected
            if not isinstance(schema, dict):
                return error_score(
                    "json_schema needs 'schema' in its options or a schema as expected answer"
                )
            try:
                validator = _check_schema(schema)(schema)
            except ValueError as e:
                return error_score(f"the expected answer is not a usable schema: {e}")
        value, err = extract_json(case.output or "", o.extract)
        if err is not None:
            return binary(self, False, {"reason": err})
        errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
        if not errors:
            return binary(self, True, {})
        listed = [
            {"path": "/".join(str(p) for p in e.absolute_path) or "$", "message": e.message[:300]}
            for e in errors[: o.max_errors]
        ]
        return binary(self, False, {"reason": "schema violations", "errors": listed})


# -- closeness ----------------------------------------------------------------


def _ratio(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() if a or b else 1.0


def _similarity(method: str, a: str, b: str) -> float:
    if method == "ratio":
        return _ratio(a, b)
    wa, wb = a.split(), b.split()
    if method == "token_sort":
        return _ratio(" ".join(sorted(wa)), " ".join(sorted(wb)))
    sa, sb = set(wa), set(wb)  # jaccard
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


class SimilarityOptions(EvalOptions):
    method: Literal["ratio", "token_sort", "jaccard"] = Field(
        "ratio",
        description="ratio: difflib character ratio; token_sort: the same on sorted words; "
        "jaccard: overlap of the word sets.",
    )
    threshold: float | None = Field(0.8, ge=0, le=1, description="passed = value >= threshold.")
    case_sensitive: bool = Field(False, description="Compare case.")
    normalize_whitespace: bool = Field(True, description="Collapse runs of whitespace.")


@register_evaluator
class Similarity(Evaluator):
    kind = "similarity"
    description = "String similarity to the expected answer (best of a list), in [0, 1]."
    Options = SimilarityOptions
    requires_expected = True

    async def evaluate(self, case: EvalCase) -> Score:
        if (bad := no_output(case)) is not None:
            return bad
        wanted = expected_texts(case.expected)
        if wanted is None:
            return missing_expected(self.kind)
        o: SimilarityOptions = self.options  # type: ignore[assignment]
        kw = {
            "case_sensitive": o.case_sensitive,
            "strip": True,
            "whitespace": o.normalize_whitespace,
        }
        out = _norm(case.output or "", **kw)
        best, best_w = -1.0, wanted[0]
        for w in wanted:
            s = _similarity(o.method, out, _norm(w, **kw))
            if s > best:
                best, best_w = s, w
        return self.finish(
            Score(value=round(best, 6), details={"method": o.method, "closest": best_w[:200]})
        )


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")


def parse_numbers(text: str) -> list[float]:
    """Every number written in ``text`` ("1,234.5", "-3", "2e-3"), in order."""
    out = []
    for m in _NUMBER.finditer(text):
        s = m.group(0)
        if not any(ch.isdigit() for ch in s):
            continue
        try:
            v = float(s.replace(",", ""))
        except ValueError:
            continue
        if math.isfinite(v):
            out.append(v)
    return out


class NumericOptions(EvalOptions):
    abs_tol: float = Field(1e-9, ge=0, description="Absolute tolerance.")
    rel_tol: float = Field(0.0, ge=0, description="Relative tolerance (of the expected value).")
    pick: Literal["last", "first", "only"] = Field(
        "last",
        description="Which number of the output is the answer (only: exactly one must appear).",
    )


@register_evaluator
class Numeric(Evaluator):
    kind = "numeric"
    description = "The number in the output equals the expected one within abs/rel tolerance."
    Options = NumericOptions
    requires_expected = True

    async def evaluate(self, case: EvalCase) -> Score:
        if (bad := no_output(case)) is not None:
            return bad
        if case.expected is None:
            return missing_expected(self.kind)
        o: NumericOptions = self.options  # type: ignore[assignment]
        if isinstance(case.expected, int | float) and not isinstance(case.expected, bool):
            want = float(case.expected)
        else:
            nums = parse_numbers(str(case.expected))
            if len(nums) != 1:
                return error_score(f"the expected answer {case.expected!r} is not one number")
            want = nums[0]
        got_all = parse_numbers(case.output or "")
        if not got_all:
            return binary(self, False, {"reason": "no number in the output", "expected": want})
        if o.pick == "only" and len(got_all) != 1:
            return binary(
                self, False, {"reason": f"{len(got_all)} numbers in the output", "expected": want}
            )
        got = got_all[0] if o.pick == "first" else got_all[-1]
        ok = math.isclose(got, want, rel_tol=o.rel_tol, abs_tol=o.abs_tol)
        return binary(self, ok, {"parsed": got, "expected": want, "diff": abs(got - want)})


# -- behaviour and bounds -----------------------------------------------------


class RefusalOptions(EvalOptions):
    expect_refusal: bool = Field(
        False, description="True: the model should refuse (value 1 when it does)."
    )


@register_evaluator
class Refusal(Evaluator):
    kind = "refusal"
    description = "1 when the model answered (or, with expect_refusal, when it refused)."
    Options = RefusalOptions

    async def evaluate(self, case: EvalCase) -> Score:
        if (bad := no_output(case)) is not None:
            return bad
        o: RefusalOptions = self.options  # type: ignore[assignment]
        refused = is_refusal(case.output)
        label = "refused" if refused else "answered"
        return binary(self, refused == o.expect_refusal, {"refused": refused}, label=label)


class LengthOptions(EvalOptions):
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=0)
    min_words: int | None = Field(None, ge=0)
    max_words: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> LengthOptions:
        if all(v is None for v in (self.min_chars, self.max_chars, self.min_words, self.max_words)):
            raise ValueError("set at least one of min_chars, max_chars, min_words, max_words")
        for unit in ("chars", "words"):
            lo, hi = getattr(self, f"min_{unit}"), getattr(self, f"max_{unit}")
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"min_{unit} ({lo}) is greater than max_{unit} ({hi})")
        return self


@register_evaluator
class Length(Evaluator):
    kind = "length"
    description = "The output's length in characters and/or words is within bounds."
    Options = LengthOptions

    async def evaluate(self, case: EvalCase) -> Score:
        if (bad := no_output(case)) is not None:
            return bad
        o: LengthOptions = self.options  # type: ignore[assignment]
        text = case.output or ""
        n = {"chars": len(text), "words": len(text.split())}
        why = []
        for unit, count in n.items():
            lo, hi = getattr(o, f"min_{unit}"), getattr(o, f"max_{unit}")
            if lo is not None and count < lo:
                why.append(f"{count} {unit} < min_{unit} {lo}")
            if hi is not None and count > hi:
                why.append(f"{count} {unit} > max_{unit} {hi}")
        details: dict[str, Any] = dict(n)
        if why:
            details["reason"] = "; ".join(why)
        return binary(self, not why, details)


class LatencyOptions(EvalOptions):
    max_ms: float = Field(gt=0, description="Slowest acceptable call (milliseconds).")


@register_evaluator
class Latency(Evaluator):
    kind = "latency"
    description = "The call took at most max_ms milliseconds."
    Options = LatencyOptions

    async def evaluate(self, case: EvalCase) -> Score:
        if case.latency_ms is None:
            return error_score("this case has no latency")
        o: LatencyOptions = self.options  # type: ignore[assignment]
        ok = case.latency_ms <= o.max_ms
        return binary(self, ok, {"latency_ms": case.latency_ms, "max_ms": o.max_ms})


class CostOptions(EvalOptions):
    max_usd: float = Field(ge=0, description="Most a call may cost (USD).")


@register_evaluator
class Cost(Evaluator):
    kind = "cost"
    description = "The call cost at most max_usd."
    Options = CostOptions

    async def evaluate(self, case: EvalCase) -> Score:
        if case.cost_usd is None:
            return error_score("this case has no cost (the model has no price?)")
        o: CostOptions = self.options  # type: ignore[assignment]
        ok = case.cost_usd <= o.max_usd
        return binary(self, ok, {"cost_usd": case.cost_usd, "max_usd": o.max_usd})
