"""The exact-match response cache: opt-in per alias (``cache_ttl_s``), keyed on the
normalised request.

Two requests share an entry when their bodies are equal once the fields that do
not change the answer (``stream``, ``stream_options``, ``user``, ``metadata``)
are removed and keys are sorted. Entries live in Redis when ``redis_url`` is set
(shared by every replica, expired by Redis), else in a bounded in-process LRU.
The cache is best effort: a Redis failure is a miss, never an error, and a
write never delays the response (``put`` schedules it).

Only successful, non-streaming responses are stored; the gateway replays a hit
for a streaming request as server-sent events.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from keel.gateway.limits import Limits

log = logging.getLogger("keel.gateway.cache")

#: Request fields that do not change the answer.
IGNORED_FIELDS = frozenset({"stream", "stream_options", "user", "metadata"})


def cache_key(alias: str, body: dict[str, Any]) -> str:
    """``alias:sha256`` of the canonical JSON of ``body`` (ignored fields removed,
    keys sorted at every level, the alias in place of ``model``)."""
    canon = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    canon["model"] = alias
    digest = hashlib.sha256(
        orjson.dumps(canon, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    ).hexdigest()
    return f"{alias}:{digest}"


class MemoryCache:
    """An LRU bounded by entry count and by total bytes, with per-entry expiry."""

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_bytes: int = 100 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._d: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: str) -> bytes | None:
        item = self._d.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= self._clock():
            self._drop(key)
            return None
        self._d.move_to_end(key)
        return value

    def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if len(value) > self.max_bytes:
            return
        if key in self._d:
            self._drop(key)
        self._d[key] = (self._clock() + ttl_s, value)
        self.bytes += len(value)
        while len(self._d) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._d)))

    def _drop(self, key: str) -> None:
        _, value = self._d.pop(key)
        self.bytes -= len(value)


class ResponseCache:
    """Cache operations on the backend that :class:`~keel.gateway.limits.Limits` uses
    now (Redis, or the in-process fallback during an outage)."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits

    key = staticmethod(cache_key)

    async def get(self, key: str) -> bytes | None:
        """The cached response body, or None (a miss, or the cache is unreachable)."""
        try:
            return await self._limits._run(lambda be: be.cache_get(key), critical=False)
        except Exception:
            log.exception("response cache: lookup failed (treated as a miss)")
            return None

    def put(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store a response for ``ttl_s`` seconds, without waiting for it."""
        if ttl_s <= 0:
            return
        self._limits._spawn(self._put(key, value, ttl_s))

    async def _put(self, key: str, value: bytes, ttl_s: float) -> None:
        try:
            await self._limits._run(lambda be: be.cache_set(key, value, ttl_s), critical=False)
        except Exception:
            log.exception("response cache: write failed")


__all__ = ["IGNORED_FIELDS", "MemoryCache", "ResponseCache", "cache_key"]
