"""Keel: a self-hosted LLMOps platform.

The public Python surface is kept small and listed in ``__all__``.
"""

from keel._version import __version__
from keel.config import Settings, load_settings

__all__ = ["Settings", "__version__", "load_settings"]
