"""The store side of online evaluation: the scan cursor and the ``eval_jobs`` work queue.

Every write transaction here starts with a write statement: on SQLite a
transaction that reads first and writes later can fail at once when the
recorder commits in between, while one that writes first waits its turn
(``busy_timeout``).

Claims are safe with several workers: PostgreSQL claims with
``FOR UPDATE SKIP LOCKED`` (two workers never wait for, or take, the same job);
SQLite has one writer at a time, so the single ``UPDATE … RETURNING`` is atomic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from keel._ids import new_id
from keel.evals.scores import NewScore, write_score
from keel.store.tables import traces
from keel.store.tables_quality import cursors, eval_jobs

J = eval_jobs.c
DAY_MS = 86_400_000
#: The trace columns the scheduler filters on.
SCAN_COLS = (
    traces.c.id,
    traces.c.started_at_ms,
    traces.c.model,
    traces.c.feature,
    traces.c.status,
    traces.c.endpoint,
)


@dataclass(frozen=True)
class Job:
    id: str
    trace_id: str
    evaluator: str
    attempts: int  # including the one just claimed


def day_start(ms: int) -> int:
    return ms // DAY_MS * DAY_MS


# -- cursor -----------------------------------------------------------------------


def read_cursor(engine: Engine, name: str) -> tuple[int, str] | None:
    with engine.connect() as conn:
        pos = conn.execute(select(cursors.c.position).where(cursors.c.name == name)).scalar()
    if pos is None:
        return None
    ms, _, tid = pos.partition(":")
    return int(ms), tid


def _pos(p: tuple[int, str]) -> str:
    return f"{p[0]}:{p[1]}"


# -- scanning ---------------------------------------------------------------------


def scan_new(engine: Engine, after: tuple[int, str], upto_ms: int, limit: int) -> list[Any]:
    """Traces after ``after`` (keyset on started_at_ms, id) that started before ``upto_ms``."""
    t = traces.c
    q = (
        select(*SCAN_COLS)
        .where(
            or_(
                t.started_at_ms > after[0],
                and_(t.started_at_ms == after[0], t.id > after[1]),
            ),
            t.started_at_ms < upto_ms,
        )
        .order_by(t.started_at_ms, t.id)
        .limit(limit)
    )
    with engine.connect() as conn:
        return conn.execute(q).fetchall()


def scan_slow(
    engine: Engine, lo_ms: int, hi: tuple[int, str], min_duration_ms: float, limit: int
) -> list[Any]:
    """Traces already behind the cursor that took long enough to have been written after
    the cursor passed them (``duration_ms >= min_duration_ms``)."""
    t = traces.c
    q = (
        select(*SCAN_COLS)
        .where(
            t.started_at_ms >= lo_ms,
            t.started_at_ms <= hi[0],
            t.duration_ms >= min_duration_ms,
        )
        .order_by(t.started_at_ms, t.id)
        .limit(limit)
    )
    with engine.connect() as conn:
        return conn.execute(q).fetchall()


def existing(engine: Engine, evaluator: str, trace_ids: list[str]) -> set[str]:
    """Which of ``trace_ids`` already have a job of ``evaluator``."""
    found: set[str] = set()
    with engine.connect() as conn:
        for i in range(0, len(trace_ids), 500):
            chunk = trace_ids[i : i + 500]
            q = select(J.trace_id).where(J.evaluator == evaluator, J.trace_id.in_(chunk))
            found.update(conn.execute(q).scalars())
    return found


def used_today(engine: Engine, evaluator: str, now: int) -> int:
    """Evaluations of ``evaluator`` admitted today (UTC): every job not skipped."""
    q = select(func.count()).where(
        J.evaluator == evaluator, J.created_at_ms >= day_start(now), J.status != "skipped"
    )
    with engine.connect() as conn:
        return int(conn.execute(q).scalar() or 0)


def judge_feature(name: str) -> str:
    """The feature a judge's own model calls are recorded under."""
    return f"keel:judge:{name}"


def spend_today(engine: Engine, evaluator: str, now: int) -> float:
    """What the judge of ``evaluator`` spent today (its gateway calls, by feature)."""
    q = select(func.coalesce(func.sum(traces.c.cost_usd), 0.0)).where(
        traces.c.feature == judge_feature(evaluator), traces.c.started_at_ms >= day_start(now)
    )
    with engine.connect() as conn:
        return float(conn.execute(q).scalar() or 0.0)


# -- scheduling -------------------------------------------------------------------


def _insert_ignore(engine: Engine) -> Any:
    ins = (postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert)(eval_jobs)
    return ins.on_conflict_do_nothing(index_elements=["trace_id", "evaluator"])


def enqueue(
    engine: Engine,
    cursor_name: str,
    old: tuple[int, str] | None,
    new: tuple[int, str] | None,
    jobs: list[dict[str, Any]],
    now: int,
) -> bool:
    """Insert ``jobs`` (ignoring those already queued) and move the cursor from ``old`` to
    ``new``, in one transaction. False (nothing written) when the cursor is no longer
    at ``old``: another scheduler moved it."""
    with engine.begin() as conn:
        if new is not None and new != old:
            if old is None:
                try:
                    with conn.begin_nested():
                        conn.execute(
                            insert(cursors).values(
                                name=cursor_name, position=_pos(new), updated_at_ms=now
                            )
                        )
                except IntegrityError:
                    conn.rollback()
                    return False
            else:
                res = conn.execute(
                    update(cursors)
                    .where(cursors.c.name == cursor_name, cursors.c.position == _pos(old))
                    .values(position=_pos(new), updated_at_ms=now)
                )
                if res.rowcount != 1:
                    conn.rollback()
                    return False
        rows = [
            {
                "id": new_id(),
                "trace_id": j["trace_id"],
                "evaluator": j["evaluator"],
                "status": j.get("status", "pending"),
                "attempts": 0,
                "next_attempt_ms": now,
                "last_error": j.get("last_error"),
                "created_at_ms": now,
                "finished_at_ms": now if j.get("status") == "skipped" else None,
            }
            for j in jobs
        ]
        for i in range(0, len(rows), 1000):
            conn.execute(_insert_ignore(engine), rows[i : i + 1000])
    return True


# -- working ----------------------------------------------------------------------


def expire(engine: Engine, now: int, max_attempts: int) -> int:
    """Fail the jobs that used up their attempts, including those whose last claim expired
    (the worker died mid-evaluation every time): nothing waits forever."""
    with engine.begin() as conn:
        res = conn.execute(
            update(eval_jobs)
            .where(
                J.attempts >= max_attempts,
                or_(J.status == "pending", and_(J.status == "running", J.claimed_until_ms < now)),
            )
            .values(
                status="failed",
                claimed_by=None,
                claimed_until_ms=None,
                finished_at_ms=now,
                last_error=func.coalesce(J.last_error, "gave up: the claim expired every time"),
            )
        )
        return int(res.rowcount or 0)


def claim(
    engine: Engine, worker: str, n: int, now: int, claim_ms: int, max_attempts: int
) -> list[Job]:
    """Take up to ``n`` due jobs: pending ones whose time has come, and running ones whose
    claim expired (their worker died). Each claim counts as an attempt."""
    due = and_(
        J.attempts < max_attempts,
        or_(
            and_(J.status == "pending", J.next_attempt_ms <= now),
            and_(J.status == "running", J.claimed_until_ms < now),
        ),
    )
    pick = select(J.id).where(due).order_by(J.next_attempt_ms, J.id).limit(n)
    values = {
        "status": "running",
        "attempts": J.attempts + 1,
        "claimed_by": worker,
        "claimed_until_ms": now + claim_ms,
    }
    ret = (J.id, J.trace_id, J.evaluator, J.attempts)
    if engine.dialect.name == "postgresql":
        c = pick.with_for_update(skip_locked=True).cte("picked")
        stmt = update(eval_jobs).where(J.id == c.c.id).values(**values).returning(*ret)
    else:
        stmt = update(eval_jobs).where(J.id.in_(pick)).values(**values).returning(*ret)
    with engine.begin() as conn:
        rows = conn.execute(stmt).fetchall()
    return [Job(*r) for r in rows]


def finish(
    engine: Engine,
    worker: str,
    now: int,
    max_attempts: int,
    done: list[tuple[str, NewScore]],
    skipped: list[tuple[str, str]],
    failed: list[tuple[Job, str, int]],
) -> dict[str, str]:
    """Record what became of claimed jobs, in one transaction.

    ``done``: (job id, score): the score (and its rollup) is written and the job marked
    done together; a score already stored (a second run of the job) is left as it is.
    ``skipped``: (job id, reason). ``failed``: (job, error, next attempt): back to
    pending, or failed once its attempts are used up — only while this worker still
    holds the claim. Returns the new status of each failed job whose claim was held.
    """
    out: dict[str, str] = {}
    with engine.begin() as conn:
        for _, score in done:
            write_score(conn, score)
        if done:
            conn.execute(
                update(eval_jobs)
                .where(J.id.in_([job_id for job_id, _ in done]))
                .values(status="done", finished_at_ms=now, claimed_by=None,
                        claimed_until_ms=None, last_error=None)
            )  # fmt: skip
        for job_id, reason in skipped:
            conn.execute(
                update(eval_jobs)
                .where(J.id == job_id)
                .values(status="skipped", last_error=reason[:2000], finished_at_ms=now,
                        claimed_by=None, claimed_until_ms=None)
            )  # fmt: skip
        for job, error, next_ms in failed:
            status = "failed" if job.attempts >= max_attempts else "pending"
            res = conn.execute(
                update(eval_jobs)
                .where(J.id == job.id, J.claimed_by == worker, J.status == "running")
                .values(status=status, last_error=error[:2000], next_attempt_ms=next_ms,
                        claimed_by=None, claimed_until_ms=None,
                        finished_at_ms=now if status == "failed" else None)
            )  # fmt: skip
            if res.rowcount == 1:
                out[job.id] = status
    return out


def release(engine: Engine, worker: str, job_ids: list[str] | None = None) -> int:
    """Give this worker's running jobs back (a clean shutdown), without using up an attempt."""
    conds = [J.claimed_by == worker, J.status == "running"]
    if job_ids is not None:
        if not job_ids:
            return 0
        conds.append(J.id.in_(job_ids))
    with engine.begin() as conn:
        res = conn.execute(
            update(eval_jobs)
            .where(*conds)
            .values(
                status="pending",
                attempts=J.attempts - 1,
                claimed_by=None,
                claimed_until_ms=None,
            )
        )
        return int(res.rowcount or 0)


def prune(engine: Engine, before_ms: int, batch: int = 5000) -> int:
    """Delete finished jobs created before ``before_ms`` (in bounded batches)."""
    total = 0
    while True:
        ids = select(J.id).where(
            J.created_at_ms < before_ms, J.status.in_(("done", "failed", "skipped"))
        )
        with engine.begin() as conn:
            res = conn.execute(delete(eval_jobs).where(J.id.in_(ids.limit(batch))))
        n = int(res.rowcount or 0)
        total += n
        if n < batch:
            return total


# -- status -----------------------------------------------------------------------


def counts(engine: Engine) -> dict[str, dict[str, int]]:
    """Jobs per evaluator and status (the queue holds ``online_job_days`` of history)."""
    q = select(J.evaluator, J.status, func.count()).group_by(J.evaluator, J.status)
    out: dict[str, dict[str, int]] = {}
    with engine.connect() as conn:
        for ev, st, n in conn.execute(q):
            out.setdefault(ev, {})[st] = int(n)
    return out


def backlog(engine: Engine) -> dict[str, int]:
    """Pending jobs per evaluator."""
    q = select(J.evaluator, func.count()).where(J.status == "pending").group_by(J.evaluator)
    with engine.connect() as conn:
        return {ev: int(n) for ev, n in conn.execute(q)}


def failed_between(engine: Engine, start_ms: int, end_ms: int) -> dict[str, int]:
    """Jobs that failed for good in [start, end), per evaluator."""
    q = (
        select(J.evaluator, func.count())
        .where(J.status == "failed", J.finished_at_ms >= start_ms, J.finished_at_ms < end_ms)
        .group_by(J.evaluator)
    )
    with engine.connect() as conn:
        return {ev: int(n) for ev, n in conn.execute(q)}


def last_errors(engine: Engine) -> dict[str, dict[str, Any]]:
    """The most recent error of each evaluator's jobs (failed, retried or skipped)."""
    out: dict[str, dict[str, Any]] = {}
    q = (
        select(J.evaluator, J.trace_id, J.status, J.last_error, J.finished_at_ms, J.created_at_ms)
        .where(J.last_error.is_not(None), J.status.in_(("pending", "failed", "skipped")))
        .order_by(func.coalesce(J.finished_at_ms, J.created_at_ms).desc())
        .limit(1000)
    )
    with engine.connect() as conn:
        for ev, tid, st, err, fin, created in conn.execute(q):
            if ev not in out:
                out[ev] = {"trace_id": tid, "status": st, "error": err, "at_ms": fin or created}
    return out
