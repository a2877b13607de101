"""Metric and parameter key rules, shared by the store and the SDK (no heavy imports)."""

from __future__ import annotations

import re
from typing import Any

from keel.errors import InvalidRequest

_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/:@ ]{0,249}$")


def check_key(key: Any, what: str = "metric") -> str:
    """Letters, digits, ``_ . - / : @`` and spaces, ≤250 characters, not starting with a symbol."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise InvalidRequest(
            f"invalid {what} key {key!r}: use letters, digits, '_', '.', '-', '/', ':', '@' "
            "and spaces (≤250 characters, not starting with a symbol)",
            param="key",
        )
    return key
