"""Helpers shared by the built-in evaluators."""

from __future__ import annotations

import re
from typing import Any

import orjson

from keel.evals.base import EvalCase, Evaluator, Score

_FENCE = re.compile(r"```(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)


def error_score(message: str, **details: Any) -> Score:
    """A score that could not be computed (value None), saying why."""
    return Score(value=None, details={"error": message, **details})


def no_output(case: EvalCase) -> Score | None:
    """The error score for a case whose call produced no output, else None."""
    if case.output is None:
        return error_score("no output to score (the model call failed)")
    return None


def missing_expected(kind: str) -> Score:
    return error_score(f"{kind} needs an expected answer; this case has none")


def expected_texts(expected: Any) -> list[str] | None:
    """A string, a number, or a list of acceptable ones → the list of texts (None: none)."""
    if expected is None:
        return None
    if isinstance(expected, list | tuple):
        out = [str(x) for x in expected if x is not None]
        return out or None
    if isinstance(expected, dict):
        return [orjson.dumps(expected).decode()]
    return [str(expected)]


def binary(ev: Evaluator, ok: bool, details: dict[str, Any], label: str | None = None) -> Score:
    """1.0/0.0; ``passed`` is ``ok`` unless the user set a ``threshold``."""
    score = Score(value=1.0 if ok else 0.0, label=label, details=details)
    if ev.options.threshold is None:
        score.passed = ok
    return ev.finish(score)


def extract_json(text: str, extract: bool = True) -> tuple[Any, str | None]:
    """Parse JSON from ``text``: the whole text, else (``extract``) the first ```json
    fence, else the outermost {...} or [...] span. Returns (value, None) or (None, why)."""
    candidates = [text.strip()]
    if extract:
        candidates += [m.strip() for m in _FENCE.findall(text)]
        for open_, close in (("{", "}"), ("[", "]")):
            i, j = text.find(open_), text.rfind(close)
            if 0 <= i < j:
                candidates.append(text[i : j + 1])
    first_err: str | None = None
    for c in candidates:
        if not c:
            continue
        try:
            return orjson.loads(c), None
        except orjson.JSONDecodeError as e:
            first_err = first_err or str(e)
    return None, f"not valid JSON: {first_err or 'empty output'}"
