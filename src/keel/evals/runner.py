"""The experiment runner: a suite's targets over a dataset version, scored, stored.

For each target the runner

1. renders every item up front (dataset rows through the target's prompt), so
   bad input is reported before anything is written or called;
2. finds an unfinished run with the same resume key (the suite's content, the
   target and the resolved dataset/prompt versions) and skips its stored items,
   or creates a new run;
3. looks the remaining items up in the output cache in a few batched reads;
4. calls the model through Keel's gateway (feature ``eval:<suite>``, so the
   calls are traced and priced like any other) with at most ``concurrency``
   items in flight, scores each output right away, and hands finished items to
   a writer that stores them in small batches;
5. at the end reads the cost of every call from the gateway's traces in
   batched queries (the gateway prices calls as it records them; the runner
   waits up to ``cost_wait_s`` for the recorder), scores the evaluators that
   need the cost, and stores the run's summary.

Cost is read from the traces rather than computed here because the gateway
knows which deployment served the call (canary splits, fallbacks) and whether
its response cache answered it. When the runner's store is not the gateway's,
costs stay unknown (shown as ``-``). An item answered from the output cache
(``cached``) keeps the trace id, latency and cost of the original call (what
the call costs), while the summary's ``spent_usd`` counts only calls made by
this run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from tqdm import tqdm

from keel.daemon import now_ms
from keel.errors import InvalidRequest, KeelError
from keel.evals.base import EvalCase, Evaluator, ModelClient, Score, build_evaluator
from keel.evals.runs import RunStore, evaluate_gates, summarize
from keel.evals.suite import Suite, TargetSpec

# Evaluators scored at the end of a run, once the calls' costs are known.
DEFERRED_KINDS = frozenset({"cost"})
_KEY_MAX = 64


@dataclass
class Item:
    key: str
    idx: int
    messages: list[dict[str, Any]]
    expected: Any
    metadata: dict[str, Any]
    body: dict[str, Any]
    cache_key: str


@dataclass
class TargetPlan:
    target: TargetSpec
    model: str
    params: dict[str, Any]
    prompt_ref: str | None
    prompt_version_id: str | None
    items: list[Item]


@dataclass
class RunOutcome:
    """What one target's run did."""

    run_id: str
    target: str
    resumed: bool
    done_before: int
    total: int
    summary: dict[str, Any]
    status: str
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class RunnerOptions:
    concurrency: int = 8
    use_cache: bool = True
    fresh: bool = False
    progress: bool = True
    batch_size: int = 50  # items per write: an interruption loses at most this many
    flush_interval_s: float = 0.5
    cost_wait_s: float = 5.0  # how long to wait for the gateway's recorder at the end
    created_by: str | None = None
    seed: int = 0


# -- turning rows into calls --------------------------------------------------


def _row_key(row: dict[str, Any]) -> str:
    rid = (row.get("metadata") or {}).get("id")
    if isinstance(rid, str | int) and not isinstance(rid, bool) and 0 < len(str(rid)) <= 56:
        return str(rid)
    content = {k: v for k, v in row.items() if k != "split"}
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def _row_messages(row: dict[str, Any], n: int) -> tuple[list[dict[str, Any]], Any]:
    """(messages, expected) of a row without a prompt."""
    if "messages" in row:  # chat
        msgs = list(row["messages"])
        if msgs and msgs[-1].get("role") == "assistant":
            return msgs[:-1], msgs[-1].get("content")
        return msgs, None
    if "prompt" in row:  # completion
        return [{"role": "user", "content": row["prompt"]}], row.get("completion")
    inp = row.get("input")
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}], row.get("expected")
    if isinstance(inp, dict) and isinstance(inp.get("messages"), list):
        return list(inp["messages"]), row.get("expected")
    raise InvalidRequest(
        f"dataset row {n}: its input is not text or chat messages; "
        "give the target a prompt that takes its fields as variables"
    )


def _row_variables(row: dict[str, Any], declared: set[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    found.update(row.get("metadata") or {})
    inp = row.get("input", row.get("prompt"))
    if isinstance(inp, dict):
        found.update(inp)
    elif inp is not None:
        found["input"] = inp
    if "expected" in row and "expected" in declared:
        found.setdefault("expected", row["expected"])
    return {k: v for k, v in found.items() if k in declared}


def cache_key(model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
    """sha256 of the model, messages and params: an identical call has the same key."""
    doc = {"model": model, "messages": messages, "params": params}
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


def plan_target(target: TargetSpec, rows: list[dict[str, Any]], prompts: Any) -> TargetPlan:
    """Render every row for ``target``; InvalidRequest naming the row when one cannot be."""
    from keel.prompts.model import RenderError, render

    spec, pv = None, None
    if target.prompt:
        try:
            pv = prompts.get(target.prompt)
        except KeelError as e:  # say which target, keep the error's kind (and status)
            e.message = f"target {target.name!r}: {e.message}"
            e.args = (e.message,)
            raise
        spec = pv.spec
    model = target.model or (spec.model if spec else None)
    if not model:
        raise InvalidRequest(
            f"target {target.name!r}: no model (give `model`, or use a prompt that names one)"
        )
    params = {**(spec.params if spec else {}), **target.params}
    declared = set(spec.variables) if spec else set()
    items: list[Item] = []
    seen: dict[str, int] = {}
    for idx, row in enumerate(rows):
        if spec is not None:
            try:
                messages, _, _ = render(spec, _row_variables(row, declared))
            except RenderError as e:
                raise InvalidRequest(
                    f"target {target.name!r}: dataset row {idx + 1}: {e.message}"
                ) from None
            expected = row.get("expected", row.get("completion"))
        else:
            messages, expected = _row_messages(row, idx + 1)
        key = _row_key(row)
        if key in seen:  # a repeated row or id: the n-th occurrence gets a suffix
            seen[key] += 1
            key = f"{key}~{seen[key]}"[:_KEY_MAX]
        else:
            seen[key] = 1
        body = {"model": model, "messages": messages, **params}
        items.append(
            Item(key, idx, messages, expected, row.get("metadata") or {}, body,
                 cache_key(model, messages, params))
        )  # fmt: skip
    return TargetPlan(target, model, params, pv.ref if pv else None, pv.id if pv else None, items)


# -- the writer -----------------------------------------------------------------


class _BatchWriter:
    """Stores finished items in batches, off the event loop, one batch at a time."""

    def __init__(self, store: RunStore, run_id: str, batch_size: int, interval_s: float) -> None:
        self.store, self.run_id = store, run_id
        self.batch_size, self.interval_s = batch_size, interval_s
        self.items: list[dict[str, Any]] = []
        self.cache: list[dict[str, Any]] = []
        self.wake = asyncio.Event()
        self.closing = False
        self.write_s = 0.0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop())

    def add(self, item: dict[str, Any], cache_row: dict[str, Any] | None) -> None:
        self.items.append(item)
        if cache_row is not None:
            self.cache.append(cache_row)
        if len(self.items) >= self.batch_size:
            self.wake.set()

    def _take(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        items, cache = self.items, self.cache
        self.items, self.cache = [], []
        return items, cache

    def _write(self, items: list[dict[str, Any]], cache: list[dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        self.store.write_batch(self.run_id, items, cache)
        self.write_s += time.perf_counter() - t0

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.interval_s)
            self.wake.clear()
            if self.items or self.cache:
                await asyncio.to_thread(self._write, *self._take())
            if self.closing and not self.items:
                return

    async def close(self) -> None:
        self.closing = True
        self.wake.set()
        if self.task is not None:
            await self.task

    def flush_now(self) -> None:
        """Synchronous last write (on cancellation: Ctrl-C keeps what is finished)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.items or self.cache:
            self._write(*self._take())


# -- the runner -----------------------------------------------------------------


class ExperimentRunner:
    """Runs suites: one run per target, stored with :class:`RunStore`."""

    def __init__(
        self,
        store: RunStore,
        datasets: Any,
        prompts: Any,
        client: ModelClient,
        options: RunnerOptions | None = None,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.datasets = datasets
        self.prompts = prompts
        self.client = client
        self.options = options or RunnerOptions()
        self.notify = notify or (lambda _msg: None)

    def plan(self, suite: Suite) -> tuple[str, list[TargetPlan], list[tuple[str, Evaluator]]]:
        """Resolve the dataset and prompts, render every item, build the evaluators.

        Raises before anything is written: a missing dataset, a prompt that does
        not render for some row, evaluator options that do not validate.
        """
        version = self.datasets.get(suite.dataset)
        rows: list[dict[str, Any]] = []
        for row in self.datasets.read_rows(version, suite.split):
            rows.append(row)
            if suite.limit is not None and len(rows) >= suite.limit:
                break
        if not rows:
            where = f" split {suite.split!r} of" if suite.split else ""
            raise InvalidRequest(f"no rows in{where} dataset {version.dataset}@{version.id[:12]}")
        plans = [plan_target(t, rows, self.prompts) for t in suite.targets]
        evaluators = [(e.name, build_evaluator(e.kind, e.params, self.client))
                      for e in suite.evaluators]  # fmt: skip
        return version.id, plans, evaluators

    async def run(self, suite: Suite) -> list[RunOutcome]:
        """Run (or resume) every target of ``suite``, one after the other."""
        t0 = time.perf_counter()
        version_id, plans, evaluators = await asyncio.to_thread(self.plan, suite)
        plan_s = time.perf_counter() - t0
        outcomes = []
        for p in plans:
            out = await self._run_target(suite, version_id, p, evaluators)
            out.timings["plan_s"] = plan_s
            outcomes.append(out)
        return outcomes

    async def _run_target(
        self, suite: Suite, version_id: str, plan: TargetPlan,
        evaluators: list[tuple[str, Evaluator]],
    ) -> RunOutcome:  # fmt: skip
        o = self.options
        name = plan.target.name
        rkey = suite.resume_key(name, version_id, plan.prompt_version_id)
        found = None if o.fresh else await asyncio.to_thread(self.store.find_resumable, rkey)
        done: set[str] = set()
        if found is not None:
            run_id = found["id"]
            done = await asyncio.to_thread(self.store.done_keys, run_id)
            self.notify(f"resuming run {run_id} ({name}): {len(done)} of {len(plan.items)} done")
        else:
            run_id = await asyncio.to_thread(
                lambda: self.store.create_run(
                    suite=suite.name, target=name, resume_key=rkey,
                    dataset_version_id=version_id, model=plan.model, prompt_ref=plan.prompt_ref,
                    params=plan.params, config=suite.content(), items_total=len(plan.items),
                    created_by=o.created_by,
                )
            )  # fmt: skip
        pending = [it for it in plan.items if it.key not in done]
        hits: dict[str, dict[str, Any]] = {}
        if o.use_cache and pending:
            hits = await asyncio.to_thread(self.store.cache_get, [it.cache_key for it in pending])
        live = [(n, e) for n, e in evaluators if e.kind not in DEFERRED_KINDS]
        timings = {"calls_s": 0.0, "score_s": 0.0}
        writer = _BatchWriter(self.store, run_id, o.batch_size, o.flush_interval_s)
        bar = tqdm(total=len(plan.items), initial=len(done), desc=name, unit=" items",
                   disable=not o.progress, leave=True)  # fmt: skip
        queue = iter(pending)
        feature = f"eval:{suite.name}"

        async def worker() -> None:
            for item in queue:  # a shared iterator: each item goes to one worker
                row, cache_row = await self._one(item, hits.get(item.cache_key), live, feature,
                                                 run_id, timings)  # fmt: skip
                writer.add(row, cache_row)
                bar.update(1)

        t0 = time.perf_counter()
        writer.start()
        try:
            await asyncio.gather(*(worker() for _ in range(min(o.concurrency, len(pending) or 1))))
            await writer.close()
        except BaseException:
            writer.flush_now()
            raise
        finally:
            bar.close()
        timings["items_s"] = time.perf_counter() - t0
        timings["write_s"] = writer.write_s
        t1 = time.perf_counter()
        summary = await self._finalize(suite, run_id, evaluators)
        timings["finalize_s"] = time.perf_counter() - t1
        return RunOutcome(run_id, name, found is not None, len(done), len(plan.items), summary,
                          "completed", timings)  # fmt: skip

    async def _one(
        self, item: Item, hit: dict[str, Any] | None, evaluators: list[tuple[str, Evaluator]],
        feature: str, run_id: str, timings: dict[str, float],
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:  # fmt: skip
        output: str | None = None
        error: str | None = None
        usage: dict[str, Any] = {}
        trace_id: str | None = None
        latency: float | None = None
        cache_row = None
        if hit is not None:
            output, usage = hit.get("output"), hit.get("usage") or {}
            trace_id, latency = hit.get("trace_id"), hit.get("latency_ms")
        else:
            t0 = time.perf_counter()
            try:
                res = await self.client.chat(item.body, feature=feature)
            except Exception as e:  # a failed call is a result, not a crash of the run
                error = str(e)[:2000] or type(e).__name__
                trace_id = getattr(e, "trace_id", None)
            else:
                output, usage = res.text, res.usage
                trace_id, latency = res.trace_id, res.latency_ms
                if self.options.use_cache:
                    resp = {"output": output, "usage": usage, "trace_id": trace_id,
                            "latency_ms": latency}  # fmt: skip
                    cache_row = {"key": item.cache_key, "response": orjson.dumps(resp).decode(),
                                 "created_at_ms": now_ms()}  # fmt: skip
            timings["calls_s"] += time.perf_counter() - t0
        scores: dict[str, Any] = {}
        if error is None:
            t0 = time.perf_counter()
            case = EvalCase(
                input=item.messages, output=output, expected=item.expected,
                metadata=item.metadata, latency_ms=latency,
                prompt_tokens=usage.get("prompt_tokens"),
                completion_tokens=usage.get("completion_tokens"),
                trace_id=trace_id, model=item.body["model"],
            )  # fmt: skip
            scores = await score_case(case, evaluators)
            timings["score_s"] += time.perf_counter() - t0
        row = {
            "run_id": run_id,
            "item_key": item.key,
            "idx": item.idx,
            "input": orjson.dumps(item.messages).decode(),
            "expected": None if item.expected is None else orjson.dumps(item.expected).decode(),
            "output": output,
            "error": error,
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "latency_ms": latency,
            "cost_usd": None,
            "trace_id": trace_id,
            "cached": hit is not None,
            "scores": orjson.dumps(scores).decode(),
            "created_at_ms": now_ms(),
        }
        return row, cache_row

    async def _finalize(
        self, suite: Suite, run_id: str, evaluators: list[tuple[str, Evaluator]]
    ) -> dict[str, Any]:
        items = await asyncio.to_thread(self.store.items, run_id)
        await self._fill_costs(run_id, items)
        deferred = [(n, e) for n, e in evaluators if e.kind in DEFERRED_KINDS]
        if deferred:
            updates: dict[str, dict[str, Any]] = {}
            for it in items:
                if it.get("error"):
                    continue
                case = EvalCase(input=it["input"], output=it["output"], expected=it["expected"],
                                latency_ms=it["latency_ms"], cost_usd=it["cost_usd"],
                                prompt_tokens=it["prompt_tokens"],
                                completion_tokens=it["completion_tokens"],
                                trace_id=it["trace_id"])  # fmt: skip
                it["scores"] = {**(it["scores"] or {}), **await score_case(case, deferred)}
                updates[it["item_key"]] = it["scores"]
            await asyncio.to_thread(self.store.update_scores, run_id, updates)
        summary = await asyncio.to_thread(summarize, items, suite.metrics, seed=self.options.seed)
        gates = evaluate_gates(summary, suite.thresholds)
        summary["gates"] = gates
        summary["passed"] = all(g["passed"] for g in gates)
        await asyncio.to_thread(self.store.finish, run_id, summary)
        return summary

    async def _fill_costs(self, run_id: str, items: list[dict[str, Any]]) -> None:
        """Costs of the calls from the gateway's traces (waiting briefly for its recorder)."""
        want = {it["item_key"]: it["trace_id"] for it in items
                if it.get("cost_usd") is None and it.get("trace_id")}  # fmt: skip
        if not want:
            return
        found: dict[str, float | None] = {}
        deadline = time.monotonic() + self.options.cost_wait_s
        while True:
            missing = [t for t in set(want.values()) if t not in found]
            found.update(await asyncio.to_thread(self.store.trace_costs, missing))
            if len(found) >= len(set(want.values())) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        costs = {k: found[t] for k, t in want.items() if found.get(t) is not None}
        for it in items:
            if it["item_key"] in costs:
                it["cost_usd"] = costs[it["item_key"]]
        await asyncio.to_thread(self.store.set_costs, run_id, costs)  # type: ignore[arg-type]


async def score_case(case: EvalCase, evaluators: list[tuple[str, Evaluator]]) -> dict[str, Any]:
    """``{metric: score dict}``; an evaluator that raises gives value None with the error."""

    async def one(ev: Evaluator) -> Score:
        try:
            return await ev.evaluate(case)
        except Exception as e:  # one broken evaluator must not sink the item
            return Score(value=None, details={"error": f"{type(e).__name__}: {e}"[:500]})

    local = [(n, e) for n, e in evaluators if not e.uses_model]
    remote = [(n, e) for n, e in evaluators if e.uses_model]
    out: dict[str, Any] = {}
    for n, e in local:  # no I/O: awaiting them in turn is cheaper than tasks
        out[n] = (await one(e)).to_dict()
    if remote:
        results = await asyncio.gather(*(one(e) for _, e in remote))
        for (n, _), s in zip(remote, results, strict=True):
            out[n] = s.to_dict()
    return {n: out[n] for n, _ in evaluators}
