"""Per-minute rollups, maintained by the batch writer in the same transaction.

Every column is a sum, so rollups written by several writers (replicas) for the
same minute add up with an upsert, and percentiles are read back from the
fixed-bucket histograms.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from keel.store.tables import (
    BUCKET_BOUNDS_MS,
    LAT_COLS,
    N_BUCKETS,
    ROLLUP_KEYS,
    ROLLUP_SUMS,
    TTFT_COLS,
    bucket_index,
    rollups_minute,
)

_ADDITIVE = ROLLUP_SUMS + LAT_COLS + TTFT_COLS


def rollup_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate trace rows into one rollup row per (minute, model, provider, endpoint, status)."""
    acc: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (
            r["started_at_ms"] // 60_000 * 60_000,
            r["model"],
            r.get("provider") or "",
            r["endpoint"],
            r["status"],
        )
        a = acc.get(key)
        if a is None:
            a = dict.fromkeys(_ADDITIVE, 0)
            a.update(zip(ROLLUP_KEYS, key, strict=True))
            a["latency_sum_ms"] = 0.0
            a["ttft_sum_ms"] = 0.0
            a["cost_usd"] = 0.0
            acc[key] = a
        a["requests"] += 1
        if r["status"] != "ok":
            a["errors"] += 1
        if r.get("stream"):
            a["streams"] += 1
        a["prompt_tokens"] += r.get("prompt_tokens") or 0
        a["completion_tokens"] += r.get("completion_tokens") or 0
        a["total_tokens"] += r.get("total_tokens") or 0
        a["cost_usd"] += r.get("cost_usd") or 0.0
        d = r["duration_ms"]
        a["latency_sum_ms"] += d
        a[LAT_COLS[bucket_index(d)]] += 1
        t = r.get("ttft_ms")
        if t is not None:
            a["ttft_count"] += 1
            a["ttft_sum_ms"] += t
            a[TTFT_COLS[bucket_index(t)]] += 1
    return list(acc.values())


def upsert_rollups(conn: Connection, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    dialect = conn.dialect.name
    ins_mod = postgresql if dialect == "postgresql" else sqlite
    stmt = ins_mod.insert(rollups_minute)
    stmt = stmt.on_conflict_do_update(
        index_elements=list(ROLLUP_KEYS),
        set_={c: rollups_minute.c[c] + stmt.excluded[c] for c in _ADDITIVE},
    )
    conn.execute(stmt, rows)


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


__all__ = ["N_BUCKETS", "percentile", "rollup_rows", "upsert_rollups"]
