"""The built-in evaluator kinds, and plugins from the ``keel.evaluators`` entry point group.

Importing this package registers every built-in kind in
:data:`keel.evals.base.EVALUATORS`:

- deterministic: ``exact_match``, ``contains``, ``regex``, ``json_valid``,
  ``json_schema``, ``similarity``, ``numeric``, ``refusal``, ``length``,
  ``latency``, ``cost``;
- semantic: ``semantic_similarity`` (embeddings through the gateway);
- judge: ``llm_judge`` (a rubric prompt scored by a model through the gateway);
- custom: ``python`` (a user's function named ``module:callable``).

:func:`load_plugins` adds third-party kinds from installed distributions (see
:mod:`keel.evals.evaluators.custom`); ``build_evaluator`` calls it.
"""

from __future__ import annotations

from keel.evals.evaluators import deterministic, judge, semantic  # noqa: F401  (register)
from keel.evals.evaluators.custom import ENTRY_POINT_GROUP, PLUGIN_ERRORS, load_plugins

__all__ = ["ENTRY_POINT_GROUP", "PLUGIN_ERRORS", "load_plugins"]
