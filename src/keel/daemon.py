"""The one base of Keel's background loops (sampler, probes, retention, …).

A :class:`Daemon` runs ``tick()`` every ``interval_s`` on the app's event loop,
logs and counts a failing tick and carries on. A daemon with
``singleton = True`` must run once per deployment, not once per replica: it
ticks only while it holds a lease row in the store (:class:`Lease`), so when
several replicas share PostgreSQL exactly one of them runs it, and another
takes over within ``lease_ttl_s`` when that one dies.

Blocking work (the store, psutil, sockets without asyncio) belongs in
``asyncio.to_thread`` inside ``tick()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from keel._ids import new_id
from keel.store.tables import leases

log = logging.getLogger("keel.daemon")

INSTANCE_ID = f"{socket.gethostname()}:{os.getpid()}:{new_id()[-6:]}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Lease:
    """A named lease row with an expiry; ``acquire`` also renews one already held."""

    def __init__(
        self, engine: Engine, name: str, holder: str = INSTANCE_ID, ttl_s: float = 30.0
    ) -> None:
        self.engine = engine
        self.name = name
        self.holder = holder
        self.ttl_ms = int(ttl_s * 1000)

    def acquire(self) -> bool:
        t = now_ms()
        with self.engine.begin() as conn:
            res = conn.execute(
                update(leases)
                .where(leases.c.name == self.name)
                .where((leases.c.holder == self.holder) | (leases.c.expires_at_ms < t))
                .values(holder=self.holder, expires_at_ms=t + self.ttl_ms)
            )
            if res.rowcount:
                return True
            exists = conn.execute(select(leases.c.name).where(leases.c.name == self.name)).first()
            if exists:
                return False
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(leases).values(
                        name=self.name, holder=self.holder, expires_at_ms=t + self.ttl_ms
                    )
                )
            return True
        except IntegrityError:
            return False  # another replica inserted it first

    def release(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(leases)
                .where(leases.c.name == self.name)
                .where(leases.c.holder == self.holder)
                .values(expires_at_ms=0)
            )


@dataclass
class DaemonStats:
    ticks: int = 0
    failures: int = 0
    last_error: str | None = None
    last_tick_ms: int | None = None
    last_duration_ms: float | None = None
    leader: bool = False


class Daemon:
    name: str = "daemon"
    interval_s: float = 10.0
    singleton: bool = False
    lease_ttl_s: float = 30.0

    def __init__(self, engine: Engine | None = None) -> None:
        self.engine = engine
        self.stats = DaemonStats()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._lease: Lease | None = None
        if self.singleton:
            assert engine is not None, "a singleton daemon needs the store for its lease"
            self._lease = Lease(engine, self.name, ttl_s=max(self.lease_ttl_s, self.interval_s * 3))

    async def tick(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def run_once(self) -> None:
        """One guarded tick: errors are logged and counted, never raised."""
        t0 = time.perf_counter()
        try:
            await self.tick()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.stats.failures += 1
            self.stats.last_error = f"{type(e).__name__}: {e}"[:500]
            log.exception("daemon %s: tick failed", self.name)
        finally:
            self.stats.ticks += 1
            self.stats.last_tick_ms = now_ms()
            self.stats.last_duration_ms = (time.perf_counter() - t0) * 1000

    async def _loop(self) -> None:
        while not self._stop.is_set():
            lead = True
            if self._lease is not None:
                try:
                    lead = await asyncio.to_thread(self._lease.acquire)
                except Exception as e:
                    lead = False
                    self.stats.last_error = f"lease: {type(e).__name__}: {e}"[:500]
                if lead != self.stats.leader:
                    log.info(
                        "daemon %s: %s",
                        self.name,
                        "leading on this replica" if lead else "another replica leads",
                    )
                self.stats.leader = lead
            if lead:
                await self.run_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)

    def start(self) -> None:
        if self._task is None:
            self._stop = asyncio.Event()
            self._task = asyncio.create_task(self._loop(), name=f"keel-{self.name}")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=10)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            self._task = None
        if self._lease is not None and self.stats.leader:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._lease.release)
