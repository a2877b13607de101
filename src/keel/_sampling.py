"""Deterministic sampling by key: every replica, and every rescan, picks the same items."""

from __future__ import annotations

import hashlib


def sampled(key: str, rate: float) -> bool:
    """True for a stable ``rate`` share of keys (a trace id, or ``name + trace id``)."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    h = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < rate
