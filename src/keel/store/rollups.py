"""Per-minute rollups, maintained by the batch writer in the same transaction.

Every column is a sum, so rollups written by several writers (replicas) for the
same minute add up with an upsert, and percentiles are read back from the
fixed-bucket histograms.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Connection

from keel.store.tables import (
    BUCKET_BOUNDS_MS,
    LAT_COLS,
    N_BUCKETS,
    ROLLUP_KEYS,
    ROLLUP_SUMS,
    TTFT_COLS,
    bucket_index,
    rollups_dim_minute,
    rollups_hour,
    rollups_minute,
)

_ADDITIVE = ROLLUP_SUMS + LAT_COLS + TTFT_COLS


DIM_KEYS = ("minute_ms", "dimension", "value", "status")
# Attribution fields that get their own rollups (group_by=feature|user|key).
DIMENSIONS = (("feature", "feature"), ("user", "user_id"), ("key", "api_key_id"))


def _new_acc(keys: tuple[str, ...], key: tuple) -> dict[str, Any]:
    a: dict[str, Any] = dict.fromkeys(_ADDITIVE, 0)
    a.update(zip(keys, key, strict=True))
    a["latency_sum_ms"] = 0.0
    a["ttft_sum_ms"] = 0.0
    a["cost_usd"] = 0.0
    return a


def _add(a: dict[str, Any], r: dict[str, Any], lat_col: str, ttft_col: str | None) -> None:
    a["requests"] += 1
    if r["status"] != "ok":
        a["errors"] += 1
    if r.get("stream"):
        a["streams"] += 1
    a["prompt_tokens"] += r.get("prompt_tokens") or 0
    a["completion_tokens"] += r.get("completion_tokens") or 0
    a["total_tokens"] += r.get("total_tokens") or 0
    a["cost_usd"] += r.get("cost_usd") or 0.0
    a["latency_sum_ms"] += r["duration_ms"]
    a[lat_col] += 1
    if ttft_col is not None:
        a["ttft_count"] += 1
        a["ttft_sum_ms"] += r["ttft_ms"]
        a[ttft_col] += 1


def rollup_all(
    rows: Iterable[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-minute, per-hour and per-dimension rollup rows of a batch of traces."""
    minute: dict[tuple, dict[str, Any]] = {}
    hour: dict[tuple, dict[str, Any]] = {}
    dims: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        m = r["started_at_ms"] // 60_000 * 60_000
        provider = r.get("provider") or ""
        status = r["status"]
        lat_col = LAT_COLS[bucket_index(r["duration_ms"])]
        t = r.get("ttft_ms")
        ttft_col = TTFT_COLS[bucket_index(t)] if t is not None else None
        key = (m, r["model"], provider, r["endpoint"], status)
        a = minute.get(key)
        if a is None:
            a = minute[key] = _new_acc(ROLLUP_KEYS, key)
        _add(a, r, lat_col, ttft_col)
        hkey = (m // 3_600_000 * 3_600_000, *key[1:])
        a = hour.get(hkey)
        if a is None:
            a = hour[hkey] = _new_acc(ROLLUP_KEYS, hkey)
        _add(a, r, lat_col, ttft_col)
        for dim, field in DIMENSIONS:
            v = r.get(field)
            if v:
                dkey = (m, dim, v, status)
                a = dims.get(dkey)
                if a is None:
                    a = dims[dkey] = _new_acc(DIM_KEYS, dkey)
                _add(a, r, lat_col, ttft_col)
    return list(minute.values()), list(hour.values()), list(dims.values())


_UPSERT_SQL: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}


def _upsert(
    conn: Connection, table: Table, keys: tuple[str, ...], rows: list[dict[str, Any]]
) -> None:
    """Additive upsert. The SQL is built once per table and dialect and the rows go to
    the DBAPI's executemany as tuples: building the statement with SQLAlchemy for
    every batch cost more than the write itself (it shares the GIL with the loop)."""
    if not rows:
        return
    cached = _UPSERT_SQL.get((table.name, conn.dialect.name))
    if cached is None:
        cols = (*keys, *_ADDITIVE)
        mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
        sets = ", ".join(f"{c} = {table.name}.{c} + excluded.{c}" for c in _ADDITIVE)
        sql = (
            f"INSERT INTO {table.name} ({', '.join(cols)}) "
            f"VALUES ({', '.join([mark] * len(cols))}) "
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sets}"
        )
        cached = _UPSERT_SQL[(table.name, conn.dialect.name)] = (sql, cols)
    sql, cols = cached
    conn.exec_driver_sql(sql, [tuple(r[c] for c in cols) for r in rows])


def write_rollups(conn: Connection, trace_rows: list[dict[str, Any]]) -> None:
    """Add a batch of traces to every rollup table (same transaction as the traces)."""
    minute, hour, dims = rollup_all(trace_rows)
    # Sorted keys: two writers upserting the same rows lock them in the same
    # order, so PostgreSQL cannot deadlock between replicas.
    _upsert(conn, rollups_minute, ROLLUP_KEYS, sorted(minute, key=_rkey))
    _upsert(conn, rollups_hour, ROLLUP_KEYS, sorted(hour, key=_rkey))
    _upsert(conn, rollups_dim_minute, DIM_KEYS, sorted(dims, key=_dkey))


def _rkey(a: dict[str, Any]) -> tuple:
    return tuple(a[k] for k in ROLLUP_KEYS)


def _dkey(a: dict[str, Any]) -> tuple:
    return tuple(a[k] for k in DIM_KEYS)


def percentile(buckets: Sequence[int], q: float) -> float | None:
    """The q-quantile (0..1) of a fixed-bucket histogram, in ms.

    Interpolates geometrically inside the bucket (buckets are log-spaced), so
    the error stays within the bucket ratio.
    """
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0.0
    for i, n in enumerate(buckets):
        if n == 0:
            continue
        if seen + n >= rank:
            frac = (rank - seen) / n
            hi = BUCKET_BOUNDS_MS[i] if i < len(BUCKET_BOUNDS_MS) else BUCKET_BOUNDS_MS[-1] * 1.5
            lo = BUCKET_BOUNDS_MS[i - 1] if i > 0 else hi / 1.5
            return lo * (hi / lo) ** frac
        seen += n
    return BUCKET_BOUNDS_MS[-1]


__all__ = ["N_BUCKETS", "percentile", "rollup_all", "write_rollups"]
