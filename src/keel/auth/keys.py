"""Virtual API keys: created once, stored hashed, verified from an in-process cache.

A key is ``sk-keel-`` followed by 40 url-safe random characters (240 bits), so
a plain SHA-256 of it is a safe thing to store and look up: there is nothing
to brute-force that a slow hash would protect. The first 12 characters are
kept for display.

Verification is on every gateway call, so it is a SHA-256 and a dict lookup on
a cache hit. A miss reads the store in a worker thread. Revocation must reach
every replica at once: ``revoke`` publishes the key id on Redis and every
:class:`KeyStore` with a ``redis_url`` subscribes and evicts it. Without Redis
(or while it is down) a replica trusts a verified key for ``cache_s`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine

from keel._ids import new_id
from keel.auth import _revocations
from keel.auth._parse import PERIODS, parse_budget, parse_expires  # noqa: F401 (re-exported)
from keel.daemon import now_ms
from keel.errors import Conflict, InvalidRequest, KeelError, NotFound, StoreUnavailable
from keel.store.tables import api_keys

log = logging.getLogger("keel.auth")

Role = Literal["admin", "approver", "read", "user"]
ROLES: tuple[str, ...] = ("admin", "approver", "read", "user")
SECRET_PREFIX = "sk-keel-"
SECRET_LEN = len(SECRET_PREFIX) + 40
DISPLAY_PREFIX_LEN = 12
REVOKE_CHANNEL = "keel:keys:revoked"
NEGATIVE_CACHE_S = 1.0
_MAX_CACHE = 10_000


class AuthError(KeelError):
    """No key, or a key that is unknown, revoked or expired (401)."""

    status = 401
    type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key")


class Forbidden(KeelError):
    """A valid key whose role may not do this (403)."""

    status = 403
    type = "permission_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="insufficient_role")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What Keel knows about a key; never its secret or hash."""

    id: str
    name: str
    prefix: str
    role: str
    budget_usd: float | None = None
    budget_period: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    models: frozenset[str] | None = None
    expires_at_ms: int | None = None
    revoked_at_ms: int | None = None
    created_at_ms: int | None = None
    created_by: str | None = None

    def allows_model(self, alias: str) -> bool:
        """Whether this key may call the model alias (no list: every model)."""
        return self.models is None or alias in self.models

    def expired(self, at_ms: int | None = None) -> bool:
        return self.expires_at_ms is not None and self.expires_at_ms <= (at_ms or now_ms())

    @property
    def active(self) -> bool:
        return self.revoked_at_ms is None and not self.expired()

    @property
    def principal(self) -> str:
        """How the audit log names this key."""
        return f"{self.name} ({self.id})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``models`` as a sorted list."""
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "role": self.role,
            "budget_usd": self.budget_usd,
            "budget_period": self.budget_period,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "models": sorted(self.models) if self.models is not None else None,
            "expires_at_ms": self.expires_at_ms,
            "revoked_at_ms": self.revoked_at_ms,
            "created_at_ms": self.created_at_ms,
            "created_by": self.created_by,
        }


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _record(row: Any) -> KeyRecord:
    m = row._mapping
    models = m["models"]
    return KeyRecord(
        id=m["id"],
        name=m["name"],
        prefix=m["prefix"],
        role=m["role"],
        budget_usd=m["budget_usd"],
        budget_period=m["budget_period"],
        rpm=m["rpm"],
        tpm=m["tpm"],
        models=frozenset(orjson.loads(models)) if models else None,
        expires_at_ms=m["expires_at_ms"],
        revoked_at_ms=m["revoked_at_ms"],
        created_at_ms=m["created_at_ms"],
        created_by=m["created_by"],
    )


# -- parsing what people type: keel.auth._parse ------------------------------


def _check(
    name: str,
    role: str,
    budget_usd: float | None,
    budget_period: str | None,
    rpm: int | None,
    tpm: int | None,
    models: Any,
    expires_at_ms: int | None,
) -> None:
    if not name or not name.strip() or len(name) > 200:
        raise InvalidRequest("name must be 1 to 200 characters", param="name")
    if role not in ROLES:
        raise InvalidRequest(f"role must be one of {', '.join(ROLES)}; got {role!r}", param="role")
    if budget_usd is not None and budget_usd <= 0:
        raise InvalidRequest("budget_usd must be positive", param="budget_usd")
    if budget_period not in PERIODS:
        raise InvalidRequest(
            f"budget_period must be one of {', '.join(PERIODS)}", param="budget_period"
        )
    for field, v in (("rpm", rpm), ("tpm", tpm)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InvalidRequest(f"{field} must be a positive integer", param=field)
    if models is not None and (
        isinstance(models, str) or not all(isinstance(m, str) and m for m in models)
    ):
        raise InvalidRequest("models must be a list of model names", param="models")
    if expires_at_ms is not None and expires_at_ms <= now_ms():
        raise InvalidRequest("the expiry is in the past", param="expires")


class KeyStore:
    """Keys in the store, a verification cache, and revocations over Redis.

    The sync methods (``create``, ``list``, ``revoke``, ``get``) are for the CLI
    and sync API routes; ``verify`` is for the request path. Call ``start()``
    on the event loop that serves requests and ``aclose()`` at shutdown.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        redis_url: str | None,
        cache_s: float,
        negative_cache_s: float = NEGATIVE_CACHE_S,
        channel: str = REVOKE_CHANNEL,
    ) -> None:
        self.engine = engine
        self.redis_url = redis_url
        self.cache_s = cache_s
        self.negative_cache_s = negative_cache_s
        self.channel = channel
        # sha256 hex → (monotonic expiry, record or None); id → hash of cached records
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}
        self._ids: dict[str, str] = {}
        self._inflight: dict[str, asyncio.Task[KeyRecord | None]] = {}
        # Bumped on every eviction: a lookup that started before one may have read
        # a row that is revoked by now, so its result is not cached.
        self._epoch = 0
        self._task: asyncio.Task[None] | None = None
        self._first_attempt: asyncio.Event | None = None
        self.subscribed = False
        self.lookups = 0  # store reads (cache misses), for tests and metrics
        self._stale_warned = 0.0

    # -- management (sync) ----------------------------------------------------

    def create(
        self,
        name: str,
        role: str = "user",
        budget_usd: float | None = None,
        budget_period: str = "month",
        rpm: int | None = None,
        tpm: int | None = None,
        models: list[str] | frozenset[str] | None = None,
        expires_at_ms: int | None = None,
        created_by: str | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key; returns its record and the secret, which is never stored."""
        _check(name, role, budget_usd, budget_period, rpm, tpm, models, expires_at_ms)
        secret = SECRET_PREFIX + secrets.token_urlsafe(30)
        row = {
            "id": new_id(),
            "name": name.strip(),
            "prefix": secret[:DISPLAY_PREFIX_LEN],
            "hash": hash_secret(secret),
            "role": role,
            "budget_usd": float(budget_usd) if budget_usd is not None else None,
            "budget_period": budget_period,
            "rpm": rpm,
            "tpm": tpm,
            "models": orjson.dumps(sorted(set(models))).decode() if models is not None else None,
            "created_at_ms": now_ms(),
            "expires_at_ms": expires_at_ms,
            "revoked_at_ms": None,
            "created_by": created_by,
        }
        with self.engine.begin() as conn:
            conn.execute(insert(api_keys).values(**row))
        return self.get(row["id"]), secret

    def get(self, key_id: str) -> KeyRecord:
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        if row is None:
            raise NotFound(f"no key with id '{key_id}'", code="key_not_found")
        return _record(row)

    def list(self) -> list[KeyRecord]:
        """Every key, newest first, revoked ones included."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.id.desc())).all()
        return [_record(r) for r in rows]

    def find(self, key_id_or_prefix: str) -> KeyRecord:
        """A key by id, or by its display prefix (``sk-keel-ab12``)."""
        ref = key_id_or_prefix.strip().rstrip("…").rstrip(".")
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(api_keys).where((api_keys.c.id == ref) | (api_keys.c.prefix == ref))
            ).all()
        if not rows:
            raise NotFound(f"no key with id or prefix '{ref}'", code="key_not_found")
        if len(rows) > 1:
            raise Conflict(f"the prefix '{ref}' matches {len(rows)} keys; use the key id")
        return _record(rows[0])

    def revoke(self, key_id_or_prefix: str) -> KeyRecord:
        """Revoke a key now, here and (through Redis) on every replica."""
        rec = self.find(key_id_or_prefix)
        if rec.revoked_at_ms is not None:
            raise Conflict(f"key {rec.prefix}… ({rec.id}) is already revoked")
        t = now_ms()
        with self.engine.begin() as conn:
            n = conn.execute(
                update(api_keys)
                .where(api_keys.c.id == rec.id)
                .where(api_keys.c.revoked_at_ms.is_(None))
                .values(revoked_at_ms=t)
            ).rowcount
        if not n:
            raise Conflict(f"key {rec.prefix}… ({rec.id}) is already revoked")
        self.evict(rec.id)
        self._publish(rec.id)
        return self.get(rec.id)

    def _publish(self, key_id: str) -> bool:
        if not self.redis_url:
            return False
        try:
            import redis

            client = redis.Redis.from_url(
                self.redis_url, socket_connect_timeout=2, socket_timeout=2
            )
            try:
                client.publish(self.channel, key_id)
            finally:
                client.close()
            return True
        except Exception as e:
            log.warning(
                "could not publish the revocation of key %s on Redis (%s: %s); other "
                "replicas drop it from their cache within auth.key_cache_s (%.0f s)",
                key_id,
                type(e).__name__,
                e,
                self.cache_s,
            )
            return False

    # -- verification (async, the request path) -------------------------------

    def evict(self, key_id: str) -> None:
        """Forget a cached key (a revocation seen here or on Redis)."""
        self._epoch += 1
        h = self._ids.pop(key_id, None)
        if h is not None:
            self._cache.pop(h, None)

    def clear(self) -> None:
        self._epoch += 1
        self._cache.clear()
        self._ids.clear()

    async def verify(self, secret: str) -> KeyRecord | None:
        """The active key for ``secret``, or None when unknown, revoked or expired.

        Raises :class:`StoreUnavailable` when the store cannot be read and the key
        was never seen by this process."""
        if len(secret) != SECRET_LEN or not secret.startswith(SECRET_PREFIX):
            return None  # not a Keel key: no store read for garbage
        h = hashlib.sha256(secret.encode()).hexdigest()
        hit = self._cache.get(h)
        if hit is not None and hit[0] > time.monotonic():
            rec = hit[1]
        else:
            # One store read per key at a time, in a task of its own so that a
            # caller that goes away does not fail the others waiting on it.
            task = self._inflight.get(h)
            if task is None:
                task = asyncio.create_task(self._load(h, hit))
                self._inflight[h] = task
                task.add_done_callback(functools.partial(self._loaded, h))
            rec = await asyncio.shield(task)
        if rec is not None and rec.expires_at_ms is not None and rec.expires_at_ms <= now_ms():
            return None
        return rec

    def _loaded(self, h: str, task: asyncio.Task[KeyRecord | None]) -> None:
        if self._inflight.get(h) is task:
            del self._inflight[h]
        if not task.cancelled():
            task.exception()  # retrieved, even when every caller went away

    async def _load(self, h: str, stale: tuple[float, KeyRecord | None] | None) -> KeyRecord | None:
        epoch = self._epoch
        self.lookups += 1
        try:
            rec = await asyncio.to_thread(self._lookup, h)
        except Exception as e:
            return self._stale_or_raise(stale, e)
        if self._epoch == epoch:
            self._put(h, rec)
        elif rec is not None:
            # Evicted while we read: the row may be revoked by now; read again next time.
            return None
        return rec

    def _stale_or_raise(
        self, stale: tuple[float, KeyRecord | None] | None, e: Exception
    ) -> KeyRecord | None:
        # The store is down. A key cannot be revoked while it is down either, so
        # a key verified before keeps working rather than failing every call.
        t = time.monotonic()
        if stale is not None and stale[1] is not None:
            if t - self._stale_warned > 30:
                self._stale_warned = t
                log.warning(
                    "cannot read keys from the store (%s: %s); trusting keys verified before",
                    type(e).__name__,
                    e,
                )
            return stale[1]
        log.warning("cannot verify a key: the store is unavailable (%s: %s)", type(e).__name__, e)
        raise StoreUnavailable("cannot verify the API key: the store is unavailable") from e

    def _lookup(self, h: str) -> KeyRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.hash == h)).first()
        if row is None:
            return None
        rec = _record(row)
        return rec if rec.active else None

    def _put(self, h: str, rec: KeyRecord | None) -> None:
        if len(self._cache) >= _MAX_CACHE:
            t = time.monotonic()
            # list() copies atomically: revoke() may evict from a worker thread.
            for k, (exp, old) in list(self._cache.items()):
                if exp <= t:
                    self._cache.pop(k, None)
                    if old is not None:
                        self._ids.pop(old.id, None)
            if len(self._cache) >= _MAX_CACHE:  # a flood of distinct bad keys
                self._cache.clear()
                self._ids.clear()
        # With cache_s 0 a record is still kept (already expired): a store outage
        # falls back on it.
        ttl = self.cache_s if rec is not None else self.negative_cache_s
        self._cache[h] = (time.monotonic() + ttl, rec)
        if rec is not None:
            self._ids[rec.id] = h

    # -- revocations from other replicas ---------------------------------------

    async def start(self, wait_s: float = 2.0) -> None:
        """Subscribe to revocations (with a ``redis_url``); waits up to ``wait_s``
        for the first attempt so a replica is listening once it serves."""
        if not self.redis_url or self._task is not None:
            return
        self._first_attempt = asyncio.Event()
        self._task = asyncio.create_task(self._listen(), name="keel-key-revocations")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), wait_s)

    async def _listen(self) -> None:
        await _revocations.listen(self)

    async def aclose(self) -> None:
        """Stop listening for revocations."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.subscribed = False
