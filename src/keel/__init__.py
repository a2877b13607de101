"""Keel: a self-hosted LLMOps platform.

The public Python surface is kept small and listed in ``__all__``. The SDK
(``init``, ``observe``, ``span``, …; see :mod:`keel.sdk`) and ``keel.prompts``
are imported on first use, so ``import keel`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keel._version import __version__
from keel.config import Settings, load_settings

if TYPE_CHECKING:
    from keel import prompts
    from keel.runs.tracking import run
    from keel.sdk import (
        feedback,
        flush,
        init,
        inject_traceparent,
        observe,
        shutdown,
        span,
        trace_headers,
    )

_SDK_NAMES = frozenset(
    {
        "feedback",
        "flush",
        "init",
        "inject_traceparent",
        "observe",
        "shutdown",
        "span",
        "trace_headers",
    }
)

__all__ = [
    "Settings",
    "__version__",
    "feedback",
    "flush",
    "init",
    "inject_traceparent",
    "load_settings",
    "observe",
    "prompts",
    "run",
    "shutdown",
    "span",
    "trace_headers",
]


def __getattr__(name: str) -> Any:
    if name in _SDK_NAMES:
        from keel import sdk

        value = getattr(sdk, name)
        globals()[name] = value
        return value
    if name == "run":  # tracked runs: httpx and psutil, not OpenTelemetry
        from keel.runs.tracking import run

        globals()["run"] = run
        return run
    if name == "prompts":  # the prompts SDK (a subpackage; only its light modules load)
        import importlib

        return importlib.import_module("keel.prompts")
    raise AttributeError(f"module 'keel' has no attribute {name!r}")
