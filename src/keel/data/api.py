"""REST: ``GET /api/datasets``, one dataset's versions, one version (with a preview), diffs.

Read-only: imports and preparation run from the CLI or CI against the same store.
"""

from __future__ import annotations

import itertools
from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from keel.data.versions import DatasetStore, VersionInfo
from keel.errors import NotFound


class Version(BaseModel):
    id: str = Field(description="Content hash (sha256 hex) of the rows and their splits.")
    dataset: str
    kind: str = Field(description="chat | completion | eval")
    parent_id: str | None = Field(description="The version this one was prepared from.")
    rows: int
    splits: dict[str, int]
    uri: str = Field(description="Where the Parquet files are (path or fsspec URL).")
    steps: list[dict[str, Any]] = Field(description="Lineage: [{step, params}] in order.")
    source: dict[str, Any] | None = Field(description="The imported file or trace filter.")
    created_at_ms: int
    created_by: str | None
    validation: dict[str, Any] | None = Field(description="Summary of the last validation.")


class DatasetSummary(BaseModel):
    name: str
    kind: str
    description: str | None
    created_at_ms: int
    versions: int
    latest: Version | None


class DatasetList(BaseModel):
    data: list[DatasetSummary]


class DatasetDetail(BaseModel):
    name: str
    kind: str
    versions: list[Version] = Field(description="Newest first.")


class VersionDetail(BaseModel):
    version: Version
    preview: list[dict[str, Any]] = Field(description="The first rows, canonical, with split.")


class Diff(BaseModel):
    a: str
    b: str
    rows_a: int
    rows_b: int
    unique_a: int
    unique_b: int
    added: int = Field(description="Rows of b whose content is not in a.")
    removed: int = Field(description="Rows of a whose content is not in b.")
    splits_a: dict[str, int]
    splits_b: dict[str, int]
    examples_added: list[dict[str, Any]]
    examples_removed: list[dict[str, Any]]


def _version(v: VersionInfo) -> Version:
    d = v.to_dict()
    d.pop("created", None)
    return Version(**d)


def make_router(store: DatasetStore) -> APIRouter:
    r = APIRouter(prefix="/api/datasets", tags=["datasets"])

    def _in(name: str, ref: str) -> VersionInfo:
        v = store.get(f"{name}@{ref}")
        if v.dataset != name:
            raise NotFound(f"no version '{ref}' in dataset '{name}'")
        return v

    @r.get("", response_model=DatasetList, summary="Datasets with their latest version")
    async def list_datasets() -> DatasetList:
        items = await run_in_threadpool(store.list)
        return DatasetList(data=[DatasetSummary(**d) for d in items])

    @r.get("/{name}", response_model=DatasetDetail, summary="A dataset's versions and lineage")
    async def get_dataset(name: str) -> DatasetDetail:
        versions = await run_in_threadpool(store.versions, name)
        kind = versions[0].kind if versions else ""
        return DatasetDetail(name=name, kind=kind, versions=[_version(v) for v in versions])

    @r.get(
        "/{name}/versions/{version_id}",
        response_model=VersionDetail,
        summary="One version (an id prefix works) and its first rows",
    )
    async def get_version(
        name: str,
        version_id: str,
        limit: int = Query(20, ge=0, le=500, description="Rows to preview."),
        split: str | None = Query(None, description="Preview only this split."),
    ) -> VersionDetail:
        def load() -> VersionDetail:
            v = _in(name, version_id)
            rows = list(itertools.islice(store.read_rows(v, split), limit))
            return VersionDetail(version=_version(v), preview=rows)

        return await run_in_threadpool(load)

    @r.get("/{name}/diff", response_model=Diff, summary="Rows added and removed between versions")
    async def diff(
        name: str,
        a: str = Query(description="The older version (id or prefix)."),
        b: str = Query(description="The newer version (id or prefix)."),
    ) -> Diff:
        def run() -> Diff:
            return Diff(**store.diff(_in(name, a), _in(name, b)))

        return await run_in_threadpool(run)

    return r
