"""Health probes of vector databases and their kin: ``qdrant``, ``chroma``,
``pgvector`` and ``redis`` components.

Imported by :mod:`keel.monitoring.probes`, which registers them on import (and
still exposes their classes); see there for how a probe kind is written.
"""

from __future__ import annotations

import contextlib
from typing import Any
from urllib.parse import quote

from keel.monitoring.probes import ComponentProbe, ProbeDown, _http_error, register_probe


@register_probe
class QdrantProbe(ComponentProbe):
    """``GET {url}/readyz``; with ``collection``, that collection must exist."""

    kind = "qdrant"

    async def probe(self) -> None:
        key = self.api_key
        headers = {"api-key": key} if key else {}
        status, body = await self.ctx.get(f"{self.url}/readyz", headers)
        if status != 200:
            raise ProbeDown(f"not ready: {_http_error(status, body)}")
        if coll := self.component.collection:
            status, body = await self.ctx.get(
                f"{self.url}/collections/{quote(coll, safe='')}", headers
            )
            if status == 404:
                raise ProbeDown(f"collection '{coll}' does not exist")
            if status != 200:
                raise ProbeDown(f"collection '{coll}': {_http_error(status, body)}")


@register_probe
class ChromaProbe(ComponentProbe):
    """``GET /api/v2/heartbeat`` (``/api/v1`` on servers before 0.6); with ``collection``,
    that collection must exist in the default tenant and database."""

    kind = "chroma"

    async def probe(self) -> None:
        key = self.api_key
        # Chroma's token auth reads "Authorization: Bearer" unless configured otherwise.
        headers = {"authorization": f"Bearer {key}"} if key else {}
        api = "v2"
        status, body = await self.ctx.get(f"{self.url}/api/v2/heartbeat", headers)
        if status == 404:
            api = "v1"
            status, body = await self.ctx.get(f"{self.url}/api/v1/heartbeat", headers)
        if status != 200:
            raise ProbeDown(f"heartbeat: {_http_error(status, body)}")
        if coll := self.component.collection:
            name = quote(coll, safe="")
            path = (
                f"/api/v2/tenants/default_tenant/databases/default_database/collections/{name}"
                if api == "v2"
                else f"/api/v1/collections/{name}"
            )
            status, body = await self.ctx.get(f"{self.url}{path}", headers)
            if status == 404:
                raise ProbeDown(f"collection '{coll}' does not exist")
            if status != 200:
                raise ProbeDown(f"collection '{coll}': {_http_error(status, body)}")


def _libpq_url(url: str) -> str:
    # keel.yaml may use SQLAlchemy's spelling of the URL.
    for prefix in ("postgresql+psycopg://", "postgresql+psycopg2://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


@register_probe
class PgvectorProbe(ComponentProbe):
    """Connect, check that the ``vector`` extension is installed and, with ``collection``,
    that the table can be read. ``api_key_env`` names the password, if any."""

    kind = "pgvector"

    async def probe(self) -> None:
        import psycopg
        from psycopg import sql

        kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(1, int(self.timeout_s + 0.999)),
        }
        if (key := self.api_key) is not None:
            kwargs["password"] = key
        conn = await psycopg.AsyncConnection.connect(_libpq_url(self.url), **kwargs)
        try:
            cur = await conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            if await cur.fetchone() is None:
                raise ProbeDown("extension 'vector' is not installed in this database")
            if table := self.component.collection:
                ident = sql.Identifier(*table.split(".", 1))
                await conn.execute(sql.SQL("SELECT 1 FROM {} LIMIT 1").format(ident))
        finally:
            await conn.close()


@register_probe
class RedisProbe(ComponentProbe):
    """``PING``. ``api_key_env`` names the password, if any."""

    kind = "redis"

    async def probe(self) -> None:
        import redis.asyncio as aredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        kwargs: dict[str, Any] = {
            "socket_timeout": self.timeout_s,
            "socket_connect_timeout": self.timeout_s,
            # A probe reports the first failure; the client's default retries
            # would turn "connection refused" into a timeout.
            "retry": Retry(NoBackoff(), 0),
        }
        if (key := self.api_key) is not None:
            kwargs["password"] = key
        client = aredis.Redis.from_url(self.url, **kwargs)
        try:
            if not await client.ping():
                raise ProbeDown("PING was not answered with PONG")
        finally:
            closer = getattr(client, "aclose", None) or client.close
            with contextlib.suppress(Exception):
                await closer()
