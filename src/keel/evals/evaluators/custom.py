"""Custom evaluators: a user's Python function, or plugins registered by entry point.

Two ways in:

- the ``python`` kind: ``{"function": "my_pkg.checks:polite", "kwargs": {...}}``
  imports ``polite`` (sync or async) and calls ``polite(case, **kwargs)``;
- a distribution declaring an entry point in the ``keel.evaluators`` group::

      [project.entry-points."keel.evaluators"]
      polite = "my_pkg.checks:polite"          # a function → kind "polite"
      toxicity = "my_pkg.checks:Toxicity"      # an Evaluator subclass

  A function entry point becomes a kind named after the entry point; an
  :class:`~keel.evals.base.Evaluator` subclass keeps its ``kind`` (or takes the
  entry point's name when it has none).

A function may return a float (the value), a bool (value 1/0 and ``passed``),
a :class:`~keel.evals.base.Score`, a dict of Score fields, or None (could not
score). An exception it raises propagates as :class:`EvaluatorError` so the
caller (an experiment, the online worker) records it and may retry.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import math
import threading
from collections.abc import Callable
from typing import Any

from pydantic import Field, field_validator

from keel.errors import InvalidRequest, KeelError
from keel.evals.base import (
    EVALUATORS,
    EvalCase,
    EvalOptions,
    Evaluator,
    Score,
    register_evaluator,
)

log = logging.getLogger("keel.evals")

ENTRY_POINT_GROUP = "keel.evaluators"
PLUGIN_ERRORS: dict[str, str] = {}  # entry point name → why it could not be loaded
_loaded = False
_lock = threading.Lock()
_SCORE_FIELDS = frozenset({"value", "label", "passed", "reasoning", "details", "cost_usd"})


class EvaluatorError(KeelError):
    """A custom evaluator failed while scoring (its exception is the ``__cause__``)."""

    type = "evaluator_error"


def import_callable(ref: str) -> Callable[..., Any]:
    """``module.path:attr`` (or ``module.path.attr``) → the object; InvalidRequest naming it."""
    mod_name, sep, attr = ref.partition(":")
    if not sep:
        mod_name, _, attr = ref.rpartition(".")
    if not mod_name or not attr:
        raise InvalidRequest(
            f"function {ref!r} must look like 'module.path:callable'", param="function"
        )
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as e:
        raise InvalidRequest(
            f"function {ref!r}: cannot import module {mod_name!r}: {type(e).__name__}: {e}",
            param="function",
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise InvalidRequest(
                f"function {ref!r}: module {mod_name!r} has no attribute {attr!r}",
                param="function",
            ) from None
    if not callable(obj):
        raise InvalidRequest(f"function {ref!r} is not callable", param="function")
    return obj


def to_score(result: Any, where: str) -> Score:
    """Turn what a user function returned into a Score."""
    if isinstance(result, Score):
        return result
    if result is None:
        return Score(value=None, details={"error": f"{where} returned None"})
    if isinstance(result, bool):
        return Score(value=1.0 if result else 0.0, passed=result)
    if isinstance(result, int | float):
        v = float(result)
        if not math.isfinite(v):
            return Score(value=None, details={"error": f"{where} returned {result!r}"})
        return Score(value=v)
    if isinstance(result, dict):
        unknown = sorted(set(result) - _SCORE_FIELDS)
        if unknown:
            raise EvaluatorError(
                f"{where} returned a dict with unknown key(s) {', '.join(unknown)} "
                f"(allowed: {', '.join(sorted(_SCORE_FIELDS))})"
            )
        d = dict(result)
        value = d.pop("value", None)
        return Score(value=None if value is None else float(value), **d)
    raise EvaluatorError(
        f"{where} returned {type(result).__name__}; return a float, bool, Score, dict or None"
    )


async def call_user(
    fn: Callable[..., Any], case: EvalCase, kwargs: dict[str, Any], where: str
) -> Score:
    try:
        result = fn(case, **kwargs)
        if inspect.isawaitable(result):
            result = await result
    except KeelError:
        raise
    except Exception as e:
        raise EvaluatorError(f"{where} raised {type(e).__name__}: {e}") from e
    return to_score(result, where)


class PythonOptions(EvalOptions):
    function: str = Field(description="'module.path:callable', called as callable(case, **kwargs).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed.")

    @field_validator("function")
    @classmethod
    def _importable(cls, v: str) -> str:
        try:
            import_callable(v)
        except InvalidRequest as e:
            raise ValueError(e.message) from None
        return v


@register_evaluator
class PythonFunction(Evaluator):
    kind = "python"
    description = "Your own function, 'module.path:callable' (sync or async), called with the case."
    Options = PythonOptions

    def __init__(self, options: PythonOptions, client: Any = None) -> None:  # type: ignore[override]
        super().__init__(options, client)
        self._fn = import_callable(options.function)

    async def evaluate(self, case: EvalCase) -> Score:
        o: PythonOptions = self.options  # type: ignore[assignment]
        score = await call_user(self._fn, case, o.kwargs, f"function {o.function!r}")
        return self.finish(score)


def function_evaluator(kind: str, fn: Callable[..., Any], description: str = "") -> type[Evaluator]:
    """An Evaluator class of ``kind`` that calls ``fn(case)`` (options: threshold only)."""
    doc = description or (inspect.getdoc(fn) or "").split("\n", 1)[0]

    async def evaluate(self: Evaluator, case: EvalCase) -> Score:
        return self.finish(await call_user(fn, case, {}, f"evaluator {kind!r}"))

    return type(
        f"FunctionEvaluator_{kind}",
        (Evaluator,),
        {"kind": kind, "description": doc, "Options": EvalOptions, "evaluate": evaluate},
    )


def load_plugins(force: bool = False) -> None:
    """Register the evaluators of the ``keel.evaluators`` entry point group (once per process,
    unless ``force``). A plugin that fails to load is logged and remembered in
    :data:`PLUGIN_ERRORS`; it never stops the built-in kinds from working."""
    global _loaded
    with _lock:
        if _loaded and not force:
            return
        _loaded = True
        try:
            eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        except Exception:  # a broken site-packages must not break evaluation
            log.exception("cannot list the %s entry points", ENTRY_POINT_GROUP)
            return
        for ep in eps:
            try:
                obj = ep.load()
                if inspect.isclass(obj) and issubclass(obj, Evaluator):
                    if not obj.kind:
                        obj.kind = ep.name
                    cls = obj
                elif callable(obj):
                    cls = function_evaluator(ep.name, obj)
                else:
                    raise TypeError(f"{ep.value} is neither an Evaluator subclass nor callable")
                if cls.kind in EVALUATORS and EVALUATORS[cls.kind] is not cls:
                    if EVALUATORS[cls.kind].__module__.startswith("keel."):
                        raise ValueError(f"kind {cls.kind!r} is a built-in evaluator")
                register_evaluator(cls)
                PLUGIN_ERRORS.pop(ep.name, None)
            except Exception as e:
                PLUGIN_ERRORS[ep.name] = f"{ep.value}: {type(e).__name__}: {e}"
                log.warning(
                    "evaluator plugin %r failed to load: %s", ep.name, PLUGIN_ERRORS[ep.name]
                )
