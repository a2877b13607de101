"""Tracked runs: parameters, metric curves, artifacts, inputs, code and environment.

``keel.run(...)`` (:func:`keel.runs.tracking.run`) is the SDK; ``keel.runs.api``
the REST API it talks to; ``keel runs`` the CLI. Imports stay light: the SDK
side needs httpx and psutil, not the store.
"""

from __future__ import annotations

from keel.runs.tracking import Run, run

__all__ = ["Run", "run"]
