"""REST under ``/api/runs``: create and update runs, log parameters, metric points,
inputs and artifact files; read them back and compare runs.

This API is the SDK's only path to the store (``keel.run`` sends everything
here), so a training process on a remote worker needs Keel's address and a key,
not database credentials.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from keel.auth.keys import KeyRecord
from keel.data.versions import DatasetStore
from keel.errors import InvalidRequest, PayloadTooLarge
from keel.prompts.store import PromptStore
from keel.runs.artifacts import ArtifactStore
from keel.runs.store import RunStore

_WRITE_CHUNK = 1024 * 1024


class RunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="What the run is (a training script, a job name).")
    experiment: str | None = Field(None, description="Groups runs that are compared together.")
    pipeline_run_id: str | None = Field(None, max_length=64, description="The pipeline run.")
    status: Literal["pending", "running"] = Field(
        "running", description="pending: created for a process that attaches via KEEL_RUN_ID."
    )
    params: dict[str, Any] | None = None
    tags: dict[str, Any] | None = None
    code: dict[str, Any] | None = Field(None, description="{commit, dirty, branch}.")
    environment: dict[str, Any] | None = Field(None, description="{python, packages: [...]}.")
    host: str | None = Field(None, max_length=200)
    started_at_ms: int | None = Field(None, ge=0)


class RunPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["running", "finished", "failed", "killed"] | None = None
    error: str | None = None
    ended_at_ms: int | None = Field(None, ge=0)
    tags: dict[str, Any] | None = None
    code: dict[str, Any] | None = None
    environment: dict[str, Any] | None = None
    host: str | None = Field(None, max_length=200)


class ParamsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    params: dict[str, Any]


class InputsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    datasets: list[str] = Field(default_factory=list, description="name, name@version, id.")
    prompts: list[str] = Field(default_factory=list, description="name, name@label, name@3.")


def _json(data: Any) -> Response:
    # Curves are long lists: serialised by orjson at once, not point by point.
    return Response(orjson.dumps(data), media_type="application/json")


def principal_of(request: Request) -> str | None:
    """How the audit log names the caller (None when auth is off)."""
    p = getattr(request.state, "keel_principal", None)
    if isinstance(p, KeyRecord):
        return "admin-env" if p.id == "admin-env" else p.principal
    return None


def make_router(
    store: RunStore,
    artifacts: ArtifactStore,
    datasets: DatasetStore,
    prompts: PromptStore,
    *,
    max_artifact_bytes: int,
) -> APIRouter:
    r = APIRouter(prefix="/api/runs", tags=["runs"])

    @r.post("", status_code=201, summary="Start a run (or prepare one for a pipeline step)")
    async def create(body: RunIn, request: Request) -> dict[str, Any]:
        kw = body.model_dump()
        return await run_in_threadpool(
            store.create, kw.pop("name"), created_by=principal_of(request), **kw
        )

    @r.get("", summary="Runs, newest first")
    async def list_runs(
        name: str | None = None,
        experiment: str | None = None,
        status: str | None = None,
        pipeline_run_id: str | None = None,
        limit: int = Query(50, ge=1, le=1000),
    ) -> dict[str, Any]:
        rows = await run_in_threadpool(
            store.list,
            name=name,
            experiment=experiment,
            status=status,
            pipeline_run_id=pipeline_run_id,
            limit=limit,
        )
        return {"data": rows}

    @r.get("/compare", summary="Parameters and final metrics side by side, metric curves")
    async def compare(
        ids: str = Query(description="Run ids, comma-separated."),
        curves: str | None = Query(None, description="Metric keys whose curves to include."),
        max_points: int = Query(500, ge=2, le=100_000, description="Per curve."),
    ) -> Response:
        id_list = [i.strip() for i in ids.split(",") if i.strip()]
        keys = [k.strip() for k in (curves or "").split(",") if k.strip()]
        got = await run_in_threadpool(store.compare, id_list, curves=keys, max_points=max_points)
        return _json(got)

    @r.get("/{run_id}", summary="One run: parameters, latest metrics, inputs, code, environment")
    async def get(run_id: str) -> dict[str, Any]:
        def load() -> dict[str, Any]:
            d = store.get(run_id)
            d["artifacts"] = artifacts.list(run_id)
            return d

        return await run_in_threadpool(load)

    @r.patch("/{run_id}", summary="Set status (finished, failed…), error, tags, code, environment")
    async def patch(run_id: str, body: RunPatch) -> dict[str, Any]:
        return await run_in_threadpool(store.update, run_id, **body.model_dump())

    @r.post("/{run_id}/params", summary="Add parameters (a changed value is 409)")
    async def params(run_id: str, body: ParamsIn) -> dict[str, Any]:
        return {"params": await run_in_threadpool(store.log_params, run_id, body.params)}

    @r.post("/{run_id}/metrics", summary="Append metric points (at most 10000 per request)")
    async def log_metrics(run_id: str, request: Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as e:
            raise InvalidRequest(f"the body is not JSON: {e}") from None
        points = body.get("metrics") if isinstance(body, dict) else None
        if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
            raise InvalidRequest(
                'send {"metrics": [{"key", "value", "step", "ts_ms"}, …]}', param="metrics"
            )
        return {"logged": await run_in_threadpool(store.log_metrics, run_id, points)}

    @r.get("/{run_id}/metrics", summary="Metric points per key, in step order")
    async def metrics(
        run_id: str,
        key: list[str] | None = Query(None, description="Only these keys (repeatable)."),
        max_points: int = Query(10_000, ge=2, le=1_000_000, description="Per key."),
    ) -> Response:
        data = await run_in_threadpool(store.metric_history, run_id, key, max_points=max_points)
        return _json({"run_id": run_id, "data": data})

    @r.post("/{run_id}/inputs", summary="Record the dataset and prompt versions the run used")
    async def inputs(run_id: str, body: InputsIn) -> dict[str, Any]:
        def resolve() -> dict[str, Any]:
            store.get(run_id)  # 404 before resolving anything
            ds = []
            for ref in body.datasets:
                v = datasets.get(ref)
                ds.append({"ref": ref, "name": v.dataset, "id": v.id})
            ps = []
            for ref in body.prompts:
                pv = prompts.get(ref)
                ps.append({"ref": ref, "name": pv.prompt, "version": pv.version, "id": pv.id})
            inputs = store.add_inputs(run_id, datasets=ds, prompts=ps)
            return {"inputs": inputs, "resolved": {"datasets": ds, "prompts": ps}}

        return await run_in_threadpool(resolve)

    @r.post("/{run_id}/artifacts", status_code=201, summary="Upload one artifact file (raw body)")
    async def upload(
        run_id: str,
        request: Request,
        path: str = Query(description="Relative path in the run's artifacts, e.g. model/w.bin."),
    ) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_artifact_bytes:
            raise PayloadTooLarge(
                f"artifact '{path}' is {int(length)} bytes; the limit is "
                f"{max_artifact_bytes // (1024 * 1024)} MiB (registry.max_artifact_mb)"
            )
        up = await run_in_threadpool(artifacts.begin, run_id, path, max_bytes=max_artifact_bytes)
        try:
            buf = bytearray()
            async for chunk in request.stream():
                buf += chunk
                if len(buf) >= _WRITE_CHUNK:
                    await run_in_threadpool(up.write, bytes(buf))
                    buf.clear()
            await run_in_threadpool(up.write, bytes(buf))
            return await run_in_threadpool(up.commit)
        except BaseException:
            await run_in_threadpool(up.abort)
            raise

    @r.get("/{run_id}/artifacts", summary="The run's artifact files")
    async def list_artifacts(
        run_id: str, prefix: str | None = Query(None, description="A file or directory.")
    ) -> dict[str, Any]:
        return {"data": await run_in_threadpool(artifacts.list, run_id, prefix)}

    @r.get("/{run_id}/artifacts/file", summary="Download one artifact file")
    async def download(run_id: str, path: str = Query()) -> StreamingResponse:
        f, size = await run_in_threadpool(artifacts.open, run_id, path)

        def chunks() -> Iterator[bytes]:
            with f:
                while block := f.read(_WRITE_CHUNK):
                    yield block

        return StreamingResponse(
            iterate_in_threadpool(chunks()),
            media_type="application/octet-stream",
            headers={"content-length": str(size)},
        )

    return r
