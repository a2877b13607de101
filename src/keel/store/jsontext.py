"""JSON stored as text columns (the schema is the same on SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import orjson


def dumps(v: Any) -> str | None:
    """A value as JSON text; None stays NULL."""
    return None if v is None else orjson.dumps(v).decode()


def loads(text: str | None) -> Any:
    """JSON text back to a value; NULL (or empty) is None."""
    return orjson.loads(text) if text else None
