"""Online evaluation: sampled production traces scored by evaluators, from a durable queue.

Two daemons (built by :func:`build_online` for the ``daemons`` role):

- :class:`OnlineScheduler` (one per deployment) reads the traces newer than its
  cursor, keeps those each configured evaluator wants (models, features,
  status, a deterministic sample), and queues one ``eval_jobs`` row per
  (trace, evaluator) — insert-ignore on the unique index, the cursor moving in
  the same transaction, so a re-scan never queues twice. Over an evaluator's
  daily budget the job is queued as ``skipped`` (visible, counted).
- :class:`OnlineWorker` (any number) claims due jobs, rebuilds the call as an
  :class:`~keel.evals.base.EvalCase` from the stored bodies, runs the evaluator
  (judges call models through the gateway under the feature
  ``keel:judge:<name>``) and writes the score, its rollup and the job's
  ``done`` in one transaction (the outcomes finished within ~0.2 s share it).
  The score's ``dedup_key`` makes a second run of the same job (a reclaimed
  stale claim, a restart) a no-op. Failures are retried with jittered
  exponential backoff up to ``evals.max_attempts``; a clean stop hands the
  unfinished claims back at once, a crashed worker's expire and are reclaimed.

Traces are scheduled once ``online_settle_s`` old, since a call is recorded when
it ends; calls slower than that are picked up by a catch-up scan every minute.
Calls of Keel's own judges and experiments (features ``keel:…``, ``eval:…``)
are never scored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.engine import Engine

from keel._sampling import sampled as _sampled
from keel.config.quality import EvalsSettings, OnlineEvaluatorSettings
from keel.daemon import INSTANCE_ID, Daemon, now_ms
from keel.errors import ConfigError, InvalidRequest
from keel.evals import online_queue as q
from keel.evals.base import Evaluator, ModelClient
from keel.evals.scores import NewScore
from keel.evals.trace_case import FeatureClient, load_traces, score_row, trace_case

log = logging.getLogger("keel.evals.online")

CURSOR = "online-evals"
MINUTE = 60_000
EXCLUDED_PREFIXES = ("keel:", "eval:")  # Keel's own calls: judges, experiments


# -- configuration --------------------------------------------------------------


def validate_online(evals: EvalsSettings, source: str = "configuration") -> None:
    """Reject online evaluators of unknown kinds, bad params, or that need an expected answer
    (production traces have none); raises ConfigError naming ``evals.online.N``."""
    from keel.evals.base import validate_evaluator

    problems = []
    for i, o in enumerate(evals.online):
        try:
            cls, _ = validate_evaluator(o.evaluator, o.params)
        except InvalidRequest as e:
            problems.append(f"  evals.online.{i} ({o.name}): {e.message}")
            continue
        if cls.requires_expected:
            problems.append(
                f"  evals.online.{i} ({o.name}): evaluator {o.evaluator!r} compares with an "
                "expected answer, which production traces do not have"
            )
    if problems:
        raise ConfigError(
            f"{source}: {len(problems)} invalid online evaluator(s)\n" + "\n".join(problems)
        )


def sampled(trace_id: str, name: str, rate: float) -> bool:
    """Deterministic: the same trace and evaluator always give the same answer (each
    evaluator samples independently of the others)."""
    return _sampled(f"{name}\x00{trace_id}", rate)


def wants(o: OnlineEvaluatorSettings, row: Any) -> bool:
    """Whether evaluator ``o`` scores this trace (before sampling)."""
    if row.endpoint != "chat":
        return False
    feature = row.feature or ""
    if feature.startswith(EXCLUDED_PREFIXES):
        return False
    if row.status != "ok" and not o.include_errors:
        return False
    if o.models and row.model not in o.models:
        return False
    return not (o.features and feature not in o.features)


# -- metrics --------------------------------------------------------------------


class OnlineMetrics:
    """Prometheus: jobs by evaluator and outcome, and the queue backlog."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.jobs = Counter(
            "keel_online_eval_jobs",
            "Online evaluation jobs by outcome (done, retried, failed, skipped, budget_skipped).",
            ["evaluator", "outcome"],
            registry=registry,
        )
        self.backlog = Gauge(
            "keel_online_eval_backlog",
            "Online evaluation jobs waiting (pending), as last seen by the scheduler.",
            ["evaluator"],
            registry=registry,
        )

    def count(self, evaluator: str, outcome: str, n: int = 1) -> None:
        if n:
            self.jobs.labels(evaluator, outcome).inc(n)


# -- scheduler ------------------------------------------------------------------


class OnlineScheduler(Daemon):
    name = "online-evals-scheduler"
    singleton = True

    def __init__(
        self,
        engine: Engine,
        evals: EvalsSettings,
        metrics: OnlineMetrics,
        *,
        late_window_s: float = 600.0,
    ) -> None:
        self.interval_s = evals.online_interval_s
        super().__init__(engine)
        self.evals = evals
        self.metrics = metrics
        self.late_window_ms = int(late_window_s * 1000)
        self._last_catchup = 0
        self._last_prune = 0

    async def tick(self) -> None:
        await asyncio.to_thread(self.schedule_once)

    def schedule_once(self, now: int | None = None) -> dict[str, int]:
        """One scan: queue jobs for the new traces (and slow late ones). Returns counts."""
        assert self.engine is not None
        engine, ev = self.engine, self.evals
        now = now if now is not None else now_ms()
        settle = int(ev.online_settle_s * 1000)
        cur = q.read_cursor(engine, CURSOR)
        start = cur or (now - int(ev.online_backfill_s * 1000), "")
        rows = list(q.scan_new(engine, start, now - settle, ev.online_batch_size))
        new = (rows[-1].started_at_ms, rows[-1].id) if rows else start
        if cur is not None and now - self._last_catchup >= MINUTE:
            # Calls slower than the settle time may have been written after the cursor
            # passed their start: look again at those (already queued ones are skipped).
            self._last_catchup = now
            lo = cur[0] - self.late_window_ms
            rows += q.scan_slow(engine, lo, cur, max(settle - 5000, 0), ev.online_batch_size)
        jobs: list[dict[str, Any]] = []
        out = {"scanned": len(rows), "queued": 0, "budget_skipped": 0}
        for o in ev.online:
            hits = (r.id for r in rows if wants(o, r) and sampled(r.id, o.name, o.sample_rate))
            ids = list(dict.fromkeys(hits))  # a trace can be in both scans
            if not ids:
                continue
            seen = q.existing(engine, o.name, ids)
            ids = [i for i in ids if i not in seen]
            allowed, why = self._allowance(o, now)
            for n, tid in enumerate(ids):
                if n < allowed:
                    jobs.append({"trace_id": tid, "evaluator": o.name})
                else:
                    jobs.append(
                        {
                            "trace_id": tid,
                            "evaluator": o.name,
                            "status": "skipped",
                            "last_error": why,
                        }
                    )
            queued = min(len(ids), allowed)
            out["queued"] += queued
            out["budget_skipped"] += len(ids) - queued
            self.metrics.count(o.name, "budget_skipped", len(ids) - queued)
        if not q.enqueue(engine, CURSOR, cur, new, jobs, now):
            log.warning("online evaluation: another scheduler moved the cursor; skipping a tick")
            return {"scanned": 0, "queued": 0, "budget_skipped": 0}
        self._housekeeping(now)
        return out

    def _allowance(self, o: OnlineEvaluatorSettings, now: int) -> tuple[int, str | None]:
        """How many more evaluations ``o`` may start today, and the skip reason past that."""
        assert self.engine is not None
        if o.max_cost_usd_per_day is not None:
            spent = q.spend_today(self.engine, o.name, now)
            if spent >= o.max_cost_usd_per_day:
                return 0, (
                    f"budget: max_cost_usd_per_day ({o.max_cost_usd_per_day:g}) reached "
                    f"today (spent {spent:.4f})"
                )
        if o.max_per_day is None:
            return 2**62, None
        used = q.used_today(self.engine, o.name, now)
        return max(o.max_per_day - used, 0), f"budget: max_per_day ({o.max_per_day}) reached today"

    def _housekeeping(self, now: int) -> None:
        assert self.engine is not None
        pending = q.backlog(self.engine)
        for o in self.evals.online:
            self.metrics.backlog.labels(o.name).set(pending.get(o.name, 0))
        if now - self._last_prune >= 3_600_000:
            self._last_prune = now
            q.prune(self.engine, now - self.evals.online_job_days * q.DAY_MS)


# -- worker ---------------------------------------------------------------------


def backoff_ms(attempts: int, base_s: float, max_s: float) -> int:
    """Exponential (base · 2^(attempts-1)) with ±25 % jitter, capped at ``max_s``."""
    delay = min(max_s, base_s * 2 ** max(attempts - 1, 0))
    return int(min(max_s, delay * random.uniform(0.75, 1.25)) * 1000)


FLUSH_S = 0.2  # longest a computed score waits to be written


@dataclass
class Outcome:
    """What became of one claimed job."""

    job: q.Job
    status: str  # done | failed | skipped | budget_skipped
    score: NewScore | None = None
    error: str | None = None


class OnlineWorker(Daemon):
    name = "online-evals-worker"
    singleton = False  # claims are safe with any number of workers

    def __init__(
        self,
        engine: Engine,
        evals: EvalsSettings,
        metrics: OnlineMetrics,
        *,
        client_factory: Callable[[], ModelClient] | None = None,
        prompt_store: Any = None,
    ) -> None:
        self.interval_s = evals.online_interval_s
        super().__init__(engine)
        self.evals = evals
        self.metrics = metrics
        self.client_factory = client_factory
        self.prompt_store = prompt_store
        self.worker_id = f"{INSTANCE_ID}:{id(self):x}"
        self.configs = {o.name: o for o in evals.online}
        self._built: dict[str, Evaluator] = {}
        self._client: ModelClient | None = None
        self._inflight: set[asyncio.Task[Any]] = set()

    def _evaluator(self, o: OnlineEvaluatorSettings) -> Evaluator:
        ev = self._built.get(o.name)
        if ev is None:
            from keel.evals.base import build_evaluator, validate_evaluator

            cls, _ = validate_evaluator(o.evaluator, o.params)
            client = None
            if cls.uses_model:
                if self._client is None:
                    if self.client_factory is None:
                        raise ConfigError("no gateway for evaluators that call models")
                    self._client = self.client_factory()
                client = FeatureClient(self._client, q.judge_feature(o.name))
            ctx = {"prompt_store": self.prompt_store} if self.prompt_store is not None else None
            ev = self._built[o.name] = build_evaluator(o.evaluator, o.params, client, context=ctx)
        return ev

    async def tick(self) -> None:
        """Claim and score jobs until none is due (or the daemon stops)."""
        assert self.engine is not None
        ev = self.evals
        await asyncio.to_thread(q.expire, self.engine, now_ms(), ev.max_attempts)
        # Claim a few rounds of work at once (fewer claim transactions), run at most
        # online_concurrency evaluations at a time, all within the claim's lifetime.
        batch = min(ev.online_concurrency * 4, 256)
        while not self._stop.is_set():
            jobs = await asyncio.to_thread(
                q.claim,
                self.engine,
                self.worker_id,
                batch,
                now_ms(),
                int(ev.claim_timeout_s * 1000),
                ev.max_attempts,
            )
            if not jobs:
                return
            deadline = time.monotonic() + ev.claim_timeout_s * 0.9
            await self._work(jobs, deadline)

    async def _work(self, jobs: list[q.Job], deadline: float) -> None:
        assert self.engine is not None
        rows = await asyncio.to_thread(load_traces, self.engine, [j.trace_id for j in jobs])
        spent = await asyncio.to_thread(self._spend, {j.evaluator for j in jobs})
        sem = asyncio.Semaphore(self.evals.online_concurrency)
        tasks = {
            asyncio.create_task(self._evaluate(j, rows.get(j.trace_id), spent, sem, deadline))
            for j in jobs
        }
        self._inflight.update(tasks)
        pending = set(tasks)
        buf: list[Outcome] = []
        last = time.monotonic()
        try:
            while pending:
                done, pending = await asyncio.wait(
                    pending, timeout=FLUSH_S, return_when=asyncio.FIRST_COMPLETED
                )
                buf += [t.result() for t in done if not t.cancelled() and not t.exception()]
                # Outcomes are written in one transaction per flush: every few tenths of
                # a second while evaluations are slow, once per batch when they are fast.
                if buf and (not pending or time.monotonic() - last >= FLUSH_S):
                    await self._record(buf)
                    buf, last = [], time.monotonic()
        finally:
            self._inflight.difference_update(tasks)
            if buf:  # stopped mid-batch: what was computed is still written
                await self._record(buf)

    def _spend(self, names: set[str]) -> dict[str, float]:
        assert self.engine is not None
        now = now_ms()
        return {
            n: q.spend_today(self.engine, n, now)
            for n in names
            if n in self.configs and self.configs[n].max_cost_usd_per_day is not None
        }

    async def _evaluate(
        self,
        job: q.Job,
        trace: Any,
        spent: dict[str, float],
        sem: asyncio.Semaphore,
        deadline: float,
    ) -> Outcome:
        o = self.configs.get(job.evaluator)
        if o is None:
            return Outcome(job, "skipped", error=f"evaluator {job.evaluator!r} is not configured")
        if trace is None:
            return Outcome(job, "skipped", error="the trace is gone (deleted by retention?)")
        case = trace_case(trace)
        if isinstance(case, str):
            return Outcome(job, "skipped", error=case)
        cap = o.max_cost_usd_per_day
        if cap is not None and spent.get(o.name, 0.0) >= cap:
            return Outcome(job, "budget_skipped", error=f"budget: max_cost_usd_per_day ({cap:g})")
        async with sem:
            try:
                evaluator = self._evaluator(o)
                timeout = max(deadline - time.monotonic(), 0.001)
                score = await asyncio.wait_for(evaluator.evaluate(case), timeout)
                if score.value is None and score.details.get("retryable"):
                    raise RuntimeError(str(score.details.get("error") or "could not score"))
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                return Outcome(job, "failed", error="timed out (before the claim expired)")
            except Exception as e:
                return Outcome(job, "failed", error=f"{type(e).__name__}: {e}")
        return Outcome(job, "done", score=score_row(o, trace, score, "online"))

    async def _record(self, outcomes: list[Outcome]) -> None:
        assert self.engine is not None
        ev = self.evals
        failed = [
            (o.job, o.error or "", now_ms() + backoff_ms(o.job.attempts, ev.retry_backoff_s,
                                                         ev.retry_backoff_max_s))
            for o in outcomes
            if o.status == "failed"
        ]  # fmt: skip
        done = [(o.job.id, o.score) for o in outcomes if o.status == "done" and o.score]
        skipped = [(o.job.id, o.error or "") for o in outcomes if "skipped" in o.status]
        # Shielded: a shutdown must not lose scores already computed.
        statuses = await asyncio.shield(
            asyncio.to_thread(
                q.finish, self.engine, self.worker_id, now_ms(), ev.max_attempts,
                done, skipped, failed,
            )
        )  # fmt: skip
        for o in outcomes:
            outcome = o.status
            if o.status == "failed":
                st = statuses.get(o.job.id)
                if st is None:
                    continue  # another worker had taken the job over
                outcome = "failed" if st == "failed" else "retried"
                log.info("online evaluation %s of trace %s: %s (%s)", o.job.evaluator,
                         o.job.trace_id, o.error, outcome)  # fmt: skip
            self.metrics.count(o.job.evaluator, outcome)

    async def stop(self) -> None:
        """Stop, and hand this worker's unfinished jobs back to the queue at once."""
        self._stop.set()
        for t in list(self._inflight):
            t.cancel()
        await super().stop()
        if self.engine is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(q.release, self.engine, self.worker_id)
        if self._client is not None and hasattr(self._client, "aclose"):
            with contextlib.suppress(Exception):
                await self._client.aclose()  # type: ignore[attr-defined]
            self._client = None


def build_online(
    engine: Engine,
    evals: EvalsSettings,
    registry: CollectorRegistry | None,
    *,
    client_factory: Callable[[], ModelClient] | None = None,
    prompt_store: Any = None,
    late_window_s: float = 600.0,
) -> list[Daemon]:
    """The scheduler and a worker, when online evaluators are configured (else none)."""
    if not evals.online:
        return []
    metrics = OnlineMetrics(registry)
    return [
        OnlineScheduler(engine, evals, metrics, late_window_s=late_window_s),
        OnlineWorker(
            engine, evals, metrics, client_factory=client_factory, prompt_store=prompt_store
        ),
    ]


def status(engine: Engine, evals: EvalsSettings, now: int | None = None) -> list[dict[str, Any]]:
    """Per configured evaluator: job counts by status, today's use and spend against the caps,
    and the last error."""
    now = now if now is not None else now_ms()
    counts = q.counts(engine)
    errors = q.last_errors(engine)
    out = []
    for o in evals.online:
        c = counts.get(o.name, {})
        out.append(
            {
                "name": o.name,
                "evaluator": o.evaluator,
                "sample_rate": o.sample_rate,
                "jobs": {
                    s: c.get(s, 0) for s in ("pending", "running", "done", "failed", "skipped")
                },
                "today": {
                    "evaluations": q.used_today(engine, o.name, now),
                    "max_per_day": o.max_per_day,
                    "spend_usd": q.spend_today(engine, o.name, now),
                    "max_cost_usd_per_day": o.max_cost_usd_per_day,
                },
                "last_error": errors.get(o.name),
            }
        )
    return out
