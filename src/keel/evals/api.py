"""REST: experiment runs, their items, and the comparison of two runs.

Read-only: experiments run from the CLI or CI (``keel eval run``) against the
same store.

- ``GET /api/evals/runs``: runs newest first (filters ``suite``, ``status``;
  ``cursor`` pagination)
- ``GET /api/evals/runs/{id}``: one run (an id prefix works) with its summary
- ``GET /api/evals/runs/{id}/items``: its items in dataset order (``after``, ``limit``)
- ``GET /api/evals/compare?a=&b=``: B against A, per metric and per item
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from keel.evals.report import compare_runs
from keel.evals.runs import RunStore


class Run(BaseModel):
    id: str
    suite: str
    target: str = Field(description="The target's name in the suite.")
    resume_key: str
    dataset_version_id: str | None
    model: str | None = Field(description="The gateway model alias called.")
    prompt_ref: str | None = Field(description="name@vN of the prompt, when one is used.")
    params: dict[str, Any] | None
    status: str = Field(description="running | completed | failed")
    items_total: int
    items_done: int
    summary: dict[str, Any] | None = Field(
        description="Per-metric mean, CI95, pass rate, n, errors; tokens, cost, latency, gates."
    )
    started_at_ms: int
    finished_at_ms: int | None
    created_by: str | None


class RunDetail(Run):
    config: dict[str, Any] | None = Field(description="The whole suite as run.")


class RunList(BaseModel):
    data: list[Run]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")


class Item(BaseModel):
    item_key: str = Field(description="The dataset row's id, or a hash of the row.")
    idx: int = Field(description="Position in the dataset version.")
    input: Any = Field(description="The chat messages sent.")
    expected: Any
    output: str | None
    error: str | None = Field(description="Why the call failed (the item then scores 0).")
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float | None
    cost_usd: float | None
    trace_id: str | None
    cached: bool = Field(description="The output came from the output cache.")
    scores: dict[str, Any] | None
    created_at_ms: int


class ItemList(BaseModel):
    data: list[Item]
    next_after: int | None = Field(description="Pass as `after` for the next page.")


class Comparison(BaseModel):
    a: dict[str, Any]
    b: dict[str, Any]
    same_dataset: bool
    paired_items: int
    only_a: int
    only_b: int
    metrics: dict[str, Any] = Field(
        description="Per metric: n, mean_a, mean_b, delta (B−A), ci_low, ci_high, p_value, "
        "wins, losses, ties (from B's side)."
    )
    regressions: list[dict[str, Any]] = Field(description="Items where B lost the most.")


def make_router(engine: Engine) -> APIRouter:
    store = RunStore(engine)
    r = APIRouter(prefix="/api/evals", tags=["evals"])

    @r.get("/runs", response_model=RunList, summary="Experiment runs, newest first")
    async def list_runs(
        suite: str | None = Query(None, description="Only runs of this suite."),
        status: Literal["running", "completed", "failed"] | None = Query(None),
        cursor: str | None = Query(None, description="`next_cursor` of the previous page."),
        limit: int = Query(50, ge=1, le=500),
    ) -> RunList:
        runs, nxt = await run_in_threadpool(
            store.list, suite=suite, status=status, cursor=cursor, limit=limit
        )
        return RunList(data=[Run(**x) for x in runs], next_cursor=nxt)

    @r.get("/runs/{run_id}", response_model=RunDetail, summary="One run and its summary")
    async def get_run(run_id: str) -> RunDetail:
        return RunDetail(**await run_in_threadpool(store.get, run_id))

    @r.get("/runs/{run_id}/items", response_model=ItemList, summary="A run's items, in order")
    async def get_items(
        run_id: str,
        after: int | None = Query(None, ge=-1, description="Only items past this position."),
        limit: int = Query(100, ge=1, le=1000),
    ) -> ItemList:
        def load() -> ItemList:
            run = store.get(run_id)
            rows = store.items(run["id"], after=after, limit=limit + 1)
            nxt = rows[limit - 1]["idx"] if len(rows) > limit else None
            return ItemList(data=[Item(**x) for x in rows[:limit]], next_after=nxt)

        return await run_in_threadpool(load)

    @r.get("/compare", response_model=Comparison, summary="Run B against run A")
    async def compare(
        a: str = Query(description="The baseline run (id or prefix)."),
        b: str = Query(description="The candidate run (id or prefix)."),
        top: int = Query(5, ge=0, le=100, description="How many regressions to list."),
    ) -> Comparison:
        rep = await run_in_threadpool(compare_runs, store, a, b, top=top)
        return Comparison(**rep)

    return r
