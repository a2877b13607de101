"""The subscriber side of key revocations: every :class:`~keel.auth.keys.KeyStore`
with a ``redis_url`` listens on its Redis channel and evicts each revoked key id
from its cache (``KeyStore.revoke`` publishes them).

Private: :meth:`KeyStore.start <keel.auth.keys.KeyStore.start>` runs :func:`listen`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keel.auth.keys import KeyStore

log = logging.getLogger("keel.auth")

_PING_EVERY_S = 10.0


async def listen(store: KeyStore) -> None:
    """Stay subscribed to ``store.channel`` (reconnecting with backoff) and evict
    every key id published there; runs until cancelled."""
    import redis.asyncio as aioredis

    assert store.redis_url is not None and store._first_attempt is not None
    backoff = 0.5
    down_since: float | None = None
    ever = False
    while True:
        client = aioredis.Redis.from_url(
            store.redis_url, socket_connect_timeout=2, socket_keepalive=True
        )
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(store.channel)
            ping_sent: float | None = None
            while True:
                msg = await pubsub.get_message(timeout=_PING_EVERY_S)
                if msg is None:
                    # A silent network failure would leave us subscribed to
                    # nothing forever: ping, and give up on a missing pong.
                    if ping_sent is not None:
                        raise ConnectionError("Redis did not answer a ping")
                    ping_sent = time.monotonic()
                    await pubsub.ping()
                    continue
                mtype = msg.get("type")
                if mtype == "message":
                    data = msg.get("data")
                    store.evict(data.decode() if isinstance(data, bytes) else str(data))
                elif mtype == "pong":
                    ping_sent = None
                elif mtype == "subscribe":
                    if ever or down_since is not None:
                        # Revocations published while we were away are lost.
                        store.clear()
                        log.info("key revocations: reconnected to Redis")
                    ever, down_since, backoff = True, None, 0.5
                    store.subscribed = True
                    store._first_attempt.set()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            store.subscribed = False
            if down_since is None:
                down_since = time.monotonic()
                log.warning(
                    "key revocations: Redis at %s unreachable (%s: %s); until it is "
                    "back, a key revoked elsewhere stays valid here for up to "
                    "auth.key_cache_s (%.0f s)",
                    _redact(store.redis_url),
                    type(e).__name__,
                    e,
                    store.cache_s,
                )
            store._first_attempt.set()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            with contextlib.suppress(Exception):
                await client.aclose()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 30.0)


def _redact(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)
