"""Dataset validation: small streaming checks run together in one pass.

A check is one registered class (:func:`register_check`). :func:`validate`
feeds every row once to every check that applies to the dataset's kind and
collects a :class:`Report`: per check a severity, a count of offending rows,
at most five examples and details. User checks are plain functions named as
``'module:function'`` (``data.checks`` in keel.yaml) or published under the
``keel.data_checks`` entry-point group.

Rows are the canonical rows of the dataset import: ``chat`` (``messages``),
``completion`` (``prompt``/``completion``) and ``eval`` (``input``/``expected``),
each with ``metadata`` and ``split``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from importlib import metadata as importlib_metadata
from typing import Any

from keel.data._check_base import (
    CHECKS,
    KINDS,
    MAX_EXAMPLES,
    Check,
    Context,
    canonical_text,
    register_check,
    row_strings,
)
from keel.data._check_base import _canon as _canon
from keel.data._check_base import _content_text as _content_text
from keel.data._check_base import _digest as _digest
from keel.data._check_base import _walk_strings as _walk_strings
from keel.data._checks_dataset import _HOLDOUT as _HOLDOUT
from keel.data._checks_dataset import (
    DuplicatesCheck,
    LabelBalanceCheck,
    LeakageCheck,
    NearDuplicatesCheck,
    PiiCheck,
)
from keel.data._checks_dataset import _split_side as _split_side
from keel.data._checks_row import _BAD_UTF8 as _BAD_UTF8
from keel.data._checks_row import _ROLES as _ROLES
from keel.data._checks_row import (
    ChatFormatCheck,
    EmptyFieldsCheck,
    InvalidUtf8Check,
    SchemaCheck,
    TokenLengthCheck,
)
from keel.data._minhash import _FMIX as _FMIX
from keel.data._minhash import _W1 as _W1
from keel.data._minhash import _W2 as _W2
from keel.data._minhash import (
    MinHasher,
    lsh_params,
    near_duplicate_pairs,
    shingle_hashes,
    word_hashes,
)
from keel.data._minhash import _clusters as _clusters
from keel.data._minhash import _fmix32 as _fmix32
from keel.data._tokens import _CHUNK as _CHUNK
from keel.data._tokens import _TIKTOKEN_URLS as _TIKTOKEN_URLS
from keel.data._tokens import CONTEXT_WINDOWS, context_window, resolve_tokenizer
from keel.data._tokens import _Estimate as _Estimate
from keel.data._tokens import _HFTokens as _HFTokens
from keel.data._tokens import _LlamaTokens as _LlamaTokens
from keel.data._tokens import _quiet_stderr as _quiet_stderr
from keel.data._tokens import _tiktoken_for as _tiktoken_for
from keel.data._tokens import _TiktokenTokens as _TiktokenTokens
from keel.data.report import _HTML as _HTML
from keel.data.report import _MARK as _MARK
from keel.data.report import CheckResult, Report
from keel.data.report import _summary as _summary
from keel.errors import InvalidRequest

__all__ = [
    "CHECKS",
    "CONTEXT_WINDOWS",
    "ENTRY_POINT_GROUP",
    "KINDS",
    "MAX_EXAMPLES",
    "ChatFormatCheck",
    "Check",
    "CheckResult",
    "Context",
    "DuplicatesCheck",
    "EmptyFieldsCheck",
    "InvalidUtf8Check",
    "LabelBalanceCheck",
    "LeakageCheck",
    "MinHasher",
    "NearDuplicatesCheck",
    "PiiCheck",
    "Report",
    "SchemaCheck",
    "TokenLengthCheck",
    "canonical_text",
    "context_window",
    "load_user_checks",
    "lsh_params",
    "near_duplicate_pairs",
    "register_check",
    "resolve_tokenizer",
    "row_strings",
    "shingle_hashes",
    "validate",
    "word_hashes",
]

ENTRY_POINT_GROUP = "keel.data_checks"


# -- user checks ---------------------------------------------------------------


def _import_ref(ref: str) -> Any:
    mod, _, attr = ref.partition(":")
    if not mod or not attr:
        raise ValueError(f"{ref!r} is not 'module:function'")
    obj: Any = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _user_result(name: str, out: Any) -> CheckResult:
    if isinstance(out, CheckResult):
        return out
    if out is None:
        return CheckResult(name, "error", description="user check")
    if isinstance(out, int) and not isinstance(out, bool):
        return CheckResult(name, "error", count=out, description="user check")
    if not isinstance(out, dict):
        raise TypeError(f"returned a {type(out).__name__}, not a dict")
    sev = out.get("severity", "error")
    if sev not in ("error", "warning"):
        raise ValueError(f"severity {sev!r} is not error|warning")
    examples = list(out.get("examples") or [])
    return CheckResult(
        str(out.get("name") or name),
        sev,
        int(out.get("count", len(examples))),
        examples[:MAX_EXAMPLES],
        dict(out.get("details") or {}),
        str(out.get("description") or "user check"),
    )


def _crashed(name: str, e: BaseException, where: str = "") -> CheckResult:
    msg = f"{where}{type(e).__name__}: {e}"
    return CheckResult(
        name, "error", 1, [{"row": None, "reason": f"check failed: {msg}"}], {"error": msg},
        "user check",
    )  # fmt: skip


def load_user_checks(refs: Iterable[str] = ()) -> tuple[list[tuple[str, Any]], list[CheckResult]]:
    """The user checks from 'module:function' refs and the entry-point group:
    ([(name, function or Check instance)], [error results for those that failed to load])."""
    found: list[tuple[str, Any]] = []
    failed: list[CheckResult] = []
    for ref in refs:
        try:
            found.append((ref, _import_ref(ref)))
        except Exception as e:
            failed.append(_crashed(ref, e, "cannot load: "))
    for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            found.append((ep.name, ep.load()))
        except Exception as e:
            failed.append(_crashed(ep.name, e, "cannot load: "))
    return found, failed


# -- the pass ------------------------------------------------------------------


def _rows_with_progress(rows: Iterable[Any], progress: bool) -> Iterator[Any]:
    if not progress:
        return iter(rows)
    from tqdm import tqdm

    return iter(tqdm(rows, desc="validate", unit=" rows", unit_scale=True, smoothing=0.1))


def validate(
    rows: Iterable[dict[str, Any]],
    kind: str,
    *,
    options: dict[str, Any] | None = None,
    user_checks: Iterable[str] = (),
    progress: bool = False,
) -> Report:
    """Run every check that applies to ``kind`` over ``rows`` in one pass.

    ``options`` maps a check name to its options (``{"token_length": {"model":
    "local"}, "near_duplicates": {"threshold": 0.9}}``; any check also takes
    ``severity``); ``"only"``/``"skip"`` list check names to run or leave out.
    ``user_checks`` are 'module:function' refs; with the ``keel.data_checks``
    entry points they are called as ``fn(kind, rows)`` after the pass, on the
    rows kept in memory, and return ``{"count", "examples", "severity",
    "details"}`` (or None when clean). A user check that raises is reported as
    an error result.
    """
    if kind not in KINDS:
        raise InvalidRequest(f"unknown dataset kind {kind!r}; use one of {', '.join(KINDS)}")
    options = dict(options or {})
    only = set(options.get("only") or CHECKS)
    skip = set(options.get("skip") or ())
    unknown = (only | skip) - set(CHECKS)
    if unknown:
        raise InvalidRequest(f"unknown check(s): {', '.join(sorted(unknown))}")
    ctx = Context(kind, options)
    checks: list[Check] = [
        cls() for name, cls in CHECKS.items() if kind in cls.applies_to and name in only - skip
    ]
    user, results_extra = load_user_checks(user_checks)
    user_fns = []
    for name, obj in user:
        if isinstance(obj, type) and issubclass(obj, Check):
            if kind in obj.applies_to:
                checks.append(obj())
        else:
            user_fns.append((name, obj))
    for c in checks:
        c.start(ctx.for_check(c.name))
    crashed: dict[str, CheckResult] = {}
    kept: list[Any] | None = [] if user_fns else None
    schema = next((c for c in checks if c.name == "schema"), None)
    active = list(checks)
    n = 0
    for i, row in enumerate(_rows_with_progress(rows, progress)):
        n = i + 1
        if kept is not None:
            kept.append(row)
        if not isinstance(row, dict):
            if schema is not None:
                schema.feed(i, row)
            continue
        ctx._set_row(i, row)
        for c in active:
            try:
                c.feed(i, row)
            except Exception as e:  # a check must never take the whole run down
                crashed[c.name] = _crashed(c.name, e, f"at row {i}: ")
                active = [a for a in active if a is not c]
    results = []
    for c in checks:
        if c.name in crashed:
            results.append(crashed[c.name])
            continue
        try:
            results.append(c.finish())
        except Exception as e:
            results.append(_crashed(c.name, e))
    for name, fn in user_fns:
        try:
            results.append(_user_result(name, fn(kind, kept)))
        except Exception as e:
            results.append(_crashed(name, e))
    return Report(kind, n, results + results_extra)
