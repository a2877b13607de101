"""Sortable identifiers: UUIDv7 (time-ordered), rendered as 32 hex characters."""

from __future__ import annotations

import uuid_utils


def new_id() -> str:
    """A new time-ordered id; lexical order is creation order (ms resolution)."""
    return uuid_utils.uuid7().hex
