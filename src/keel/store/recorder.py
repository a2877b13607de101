"""The recorder: bounded in-memory queue → batch writer thread → store.

The request path only calls :meth:`Recorder.record`, which appends to a deque
(well under a microsecond). A writer thread drains the deque in batches (by
size or by time), writes traces and their per-minute rollups in one
transaction, and never lets an exception escape.

Nothing is dropped silently:
- the store is unreachable → the batch is appended to a spill file under
  ``<data_dir>/spill`` and replayed when the store answers again;
- the queue is full → the record goes straight to the spill file;
- replay is idempotent (ids already in the store are skipped, and only the
  rows really inserted count in rollups), so a crash between a commit and the
  removal of a spill file cannot duplicate a trace;
- only when even the spill file cannot be written is a record dropped, and
  then it is counted (``dropped``) and logged.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from keel._ids import new_id
from keel.store.rollups import write_rollups
from keel.store.tables import traces
from keel.tracing.model import TRACE_FIELDS, TraceRecord

log = logging.getLogger("keel.recorder")


@dataclass
class RecorderStats:
    enqueued: int = 0
    written: int = 0
    spilled: int = 0
    replayed: int = 0
    dropped: int = 0
    write_errors: int = 0
    batches: int = 0
    store_up: bool = True
    last_error: str | None = None


class Recorder:
    """Records traces without blocking the caller. Thread-safe."""

    def __init__(
        self,
        engine: Engine,
        spill_dir: str | Path,
        *,
        queue_size: int = 100_000,
        batch_size: int = 1000,
        flush_interval_s: float = 0.25,
        replay_interval_s: float = 5.0,
    ) -> None:
        self.engine = engine
        self.spill_dir = Path(spill_dir)
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.replay_interval_s = replay_interval_s
        self.stats = RecorderStats()
        self._buf: collections.deque[TraceRecord] = collections.deque()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._spill_lock = threading.Lock()
        self._spill_file: Any = None
        self._spill_path: Path | None = None
        self._last_replay = 0.0
        #: Called from the writer thread with each drained batch, before the write
        #: (so they see every call even while the store is down). Must be fast.
        self.observers: list[Callable[[list[TraceRecord]], None]] = []
        #: Called first, in the writer thread, to change records in place before
        #: anything sees them (redaction, capture modes). Must not raise.
        self.enrichers: list[Callable[[list[TraceRecord]], None]] = []
        self._insert_sql: dict[str, str] = {}

    # -- request path -------------------------------------------------------

    def record(self, rec: TraceRecord) -> None:
        """Enqueue one trace. Never raises, never waits on the store."""
        buf = self._buf
        if len(buf) >= self.queue_size:
            # Overload: clean it here (redaction) so nothing raw reaches the disk.
            self._enrich([rec])
            self._spill([rec])
            return
        buf.append(rec)
        self.stats.enqueued += 1
        if len(buf) >= self.batch_size:
            self._wake.set()

    @property
    def queue_depth(self) -> int:
        return len(self._buf)

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="keel-recorder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write out what is queued (or spill it), then stop the thread."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        # Anything left (thread never started, or join timed out) goes to disk.
        left = self._drain(len(self._buf))
        if left:
            self._enrich(left)
            self._spill(left)
        self._close_spill()

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything enqueued so far was written or spilled."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._buf and self._idle.is_set():
                return True
            self._wake.set()
            time.sleep(0.005)
        return False

    def replay_now(self) -> int:
        """Replay spill files immediately (also done periodically). Returns rows written."""
        self._last_replay = time.monotonic()
        return self._replay()

    # -- writer thread ------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            self._idle.clear()
            try:
                while self._buf:
                    batch = self._drain(self.batch_size)
                    self._enrich(batch)
                    for obs in self.observers:
                        try:
                            obs(batch)
                        except Exception:
                            log.exception("recorder observer failed")
                    self._write_or_spill(batch)
                now = time.monotonic()
                if now - self._last_replay >= self.replay_interval_s and self._has_spill():
                    self._last_replay = now
                    self._replay()
            except Exception:  # the writer must never die
                log.exception("recorder loop error")
            finally:
                self._idle.set()
            if self._stop and not self._buf:
                if self._has_spill():
                    try:
                        self._replay()
                    except Exception:
                        log.exception("final replay failed; spill files kept")
                return

    def _enrich(self, batch: Sequence[Any]) -> None:
        for enrich in self.enrichers:
            try:
                enrich(batch)  # type: ignore[arg-type]
            except Exception:
                # Never store what an enricher failed to clean: drop the bodies
                # rather than risk keeping unredacted data.
                log.exception("recorder enricher failed; bodies dropped")
                for rec in batch:
                    rec["request_body"] = None
                    rec["response_body"] = None

    def _drain(self, n: int) -> list[TraceRecord]:
        out = []
        pop = self._buf.popleft
        try:
            for _ in range(n):
                out.append(pop())
        except IndexError:
            pass
        return out

    def _normalise(self, batch: Iterable[TraceRecord]) -> list[dict[str, Any]]:
        # executemany needs every row to carry every column.
        cols = TRACE_FIELDS
        rows = []
        for rec in batch:
            row = {c: rec.get(c) for c in cols}
            if row["stream"] is None:
                row["stream"] = False
            if row["tokens_estimated"] is None:
                row["tokens_estimated"] = False
            if row["id"] is None:
                row["id"] = new_id()
            rows.append(row)
        return rows

    def _write_or_spill(self, batch: list[TraceRecord]) -> None:
        if not batch:
            return
        rows = self._normalise(batch)
        try:
            try:
                with self.engine.begin() as conn:
                    self._insert(conn, rows)
            except IntegrityError:
                # A duplicate id (e.g. a record both spilled and queued after a
                # restart): fall back to the row-by-row dedupe path.
                with self.engine.begin() as conn:
                    rows = self._insert_new_only(conn, rows)
        except Exception as e:
            self.stats.write_errors += 1
            self.stats.last_error = f"{type(e).__name__}: {e}"[:500]
            if self.stats.store_up:
                log.warning("store write failed, spilling to %s: %s", self.spill_dir, e)
            self.stats.store_up = False
            self._spill(rows)
            return
        if not self.stats.store_up:
            log.info("store reachable again")
        self.stats.store_up = True
        self.stats.written += len(rows)
        self.stats.batches += 1

    def _insert(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        # The statement is compiled once per dialect and the rows go to the
        # DBAPI's executemany as they are: SQLAlchemy's per-row parameter
        # processing was the largest cost of the writer thread.
        sql = self._insert_sql.get(conn.dialect.name)
        if sql is None:
            mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
            sql = self._insert_sql[conn.dialect.name] = (
                f"INSERT INTO {traces.name} ({', '.join(TRACE_FIELDS)}) "
                f"VALUES ({', '.join([mark] * len(TRACE_FIELDS))})"
            )
        conn.exec_driver_sql(sql, [tuple(r[c] for c in TRACE_FIELDS) for r in rows])
        write_rollups(conn, rows)

    def _insert_new_only(self, conn: Connection, rows: list[dict[str, Any]]) -> list[dict]:
        ids = [r["id"] for r in rows]
        existing: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            existing.update(
                conn.execute(select(traces.c.id).where(traces.c.id.in_(chunk))).scalars()
            )
        seen: set[str] = set()
        fresh = []
        for r in rows:
            if r["id"] in existing or r["id"] in seen:
                continue
            seen.add(r["id"])
            fresh.append(r)
        if fresh:
            self._insert(conn, fresh)
        return fresh

    # -- spill and replay ---------------------------------------------------

    def _spill(self, rows: Sequence[TraceRecord] | Sequence[dict[str, Any]]) -> None:
        try:
            data = b"".join(orjson.dumps(r) + b"\n" for r in rows)
            with self._spill_lock:
                if self._spill_file is None:
                    self.spill_dir.mkdir(parents=True, exist_ok=True)
                    self._spill_path = self.spill_dir / f"traces-{new_id()}.jsonl"
                    self._spill_file = open(self._spill_path, "ab")
                self._spill_file.write(data)
                self._spill_file.flush()
            self.stats.spilled += len(rows)
        except Exception as e:
            self.stats.dropped += len(rows)
            self.stats.last_error = f"spill failed: {e}"[:500]
            log.error("could not spill %d trace(s), they are lost: %s", len(rows), e)

    def _close_spill(self) -> None:
        with self._spill_lock:
            if self._spill_file is not None:
                self._spill_file.close()
                self._spill_file = None

    def _has_spill(self) -> bool:
        return self._spill_file is not None or any(self.spill_dir.glob("traces-*.jsonl"))

    def spill_files(self) -> list[Path]:
        return sorted(self.spill_dir.glob("traces-*.jsonl"))

    def _replay(self) -> int:
        # Rotate: new spills go to a fresh file, never one being replayed.
        with self._spill_lock:
            if self._spill_file is not None:
                self._spill_file.close()
                self._spill_file = None
            paths = self.spill_files()
        total = 0
        for path in paths:
            rows: list[dict[str, Any]] = []
            bad = 0
            with open(path, "rb") as f:
                for line in f:
                    try:
                        rows.append(orjson.loads(line))
                    except orjson.JSONDecodeError:
                        bad += 1  # a torn last line from a crash mid-write
            # Idempotent: spill files from another version or configuration are
            # cleaned again before they reach the store.
            self._enrich(rows)
            try:
                written = 0
                for i in range(0, len(rows), self.batch_size):
                    chunk = self._normalise(rows[i : i + self.batch_size])
                    with self.engine.begin() as conn:
                        written += len(self._insert_new_only(conn, chunk))
            except Exception as e:
                self.stats.store_up = False
                self.stats.last_error = f"replay failed: {e}"[:500]
                log.info("replay of %s deferred: store still unavailable", path.name)
                return total
            if bad:
                self.stats.dropped += bad
                log.error("%s: %d unreadable line(s) could not be replayed", path.name, bad)
            os.unlink(path)
            self.stats.store_up = True
            self.stats.replayed += written
            total += written
            log.info("replayed %d spilled trace(s) from %s", written, path.name)
        return total
