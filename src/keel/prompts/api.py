"""REST: /api/prompts — push, list, resolve, label, diff and render prompts."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from keel.errors import InvalidRequest
from keel.prompts.model import render
from keel.prompts.store import PromptStore, PromptVersion


class VersionOut(BaseModel):
    id: str = Field(description="The version's id (traces.prompt_version_id).")
    name: str
    version: int
    content_hash: str
    spec: dict[str, Any]
    created_at_ms: int
    created_by: str | None
    message: str | None


class PushOut(VersionOut):
    created: bool = Field(description="False when the content equals the latest version.")


class PromptSummary(BaseModel):
    name: str
    description: str | None
    latest_version: int | None
    labels: dict[str, int]
    created_at_ms: int


class PromptList(BaseModel):
    data: list[PromptSummary]


class LabelOut(BaseModel):
    label: str
    version: int
    updated_at_ms: int
    updated_by: str | None


class PromptDetail(BaseModel):
    name: str
    versions: list[VersionOut]
    labels: list[LabelOut]


class LabelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, description="The version the label points at from now on.")


class LabelMoved(LabelOut):
    name: str
    previous_version: int | None


class DiffOut(BaseModel):
    name: str
    a: int
    b: int
    diff: str = Field(description="Unified diff of the two specs as YAML; empty when equal.")


class RenderIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ref: str = Field(description="name, name@label, name@3")
    variables: dict[str, Any] = Field(default_factory=dict)


class RenderOut(BaseModel):
    id: str
    name: str
    version: int
    messages: list[dict[str, Any]]
    model: str | None
    params: dict[str, Any]


def _out(pv: PromptVersion) -> dict[str, Any]:
    return pv.to_dict()


def _who(request: Request) -> str | None:
    p = getattr(request.state, "keel_principal", None)
    return getattr(p, "principal", None) if p is not None else None


def make_router(store: PromptStore) -> APIRouter:
    r = APIRouter(prefix="/api/prompts", tags=["prompts"])

    @r.get("", response_model=PromptList)
    def list_prompts() -> dict[str, Any]:
        """Every prompt with its latest version and labels."""
        return {"data": store.list()}

    @r.post("", response_model=PushOut, status_code=201)
    def push(
        response: Response,
        request: Request,
        spec: dict[str, Any] = Body(
            description="A prompt spec (name, messages or text, variables, model, params), "
            "plus an optional 'message' saying why."
        ),
    ) -> dict[str, Any]:
        """Push a spec: 201 with a new version, or 200 when it equals the latest."""
        spec = dict(spec)
        message = spec.pop("message", None)
        if message is not None and not isinstance(message, str):
            raise InvalidRequest("'message' must be a string", param="message")
        pv, created = store.push(spec, created_by=_who(request), message=message)
        if not created:
            response.status_code = 200
        return {**_out(pv), "created": created}

    # Fixed paths before /{name}: "resolve" and "render" are not prompt names.
    @r.get("/resolve", response_model=VersionOut)
    def resolve(ref: str = Query(description="name, name@label, name@3 or name@v3")) -> Any:
        """The version a reference points at now (what the SDK and gateway use)."""
        return _out(store.get(ref))

    @r.post("/render", response_model=RenderOut)
    def render_preview(body: RenderIn) -> dict[str, Any]:
        """Render a prompt with variables, without calling a model (a preview)."""
        pv = store.get(body.ref)
        messages, model, params = render(pv.spec, body.variables)
        return {
            "id": pv.id,
            "name": pv.prompt,
            "version": pv.version,
            "messages": messages,
            "model": model,
            "params": params,
        }

    @r.get("/{name}", response_model=PromptDetail)
    def detail(name: str) -> dict[str, Any]:
        """Every version of a prompt and its labels."""
        return {
            "name": name,
            "versions": [_out(v) for v in store.versions(name)],
            "labels": store.labels(name),
        }

    @r.get("/{name}/versions/{version}", response_model=VersionOut)
    def version(name: str, version: str) -> dict[str, Any]:
        """One version (3 or v3)."""
        return _out(store.get(name, version=version))

    @r.put("/{name}/labels/{label}", response_model=LabelMoved)
    def set_label(name: str, label: str, body: LabelIn, request: Request) -> dict[str, Any]:
        """Point a label at a version (atomic; other replicas see it within ~1 s)."""
        old = store.set_label(name, label, body.version, by=_who(request))
        row = next(x for x in store.labels(name) if x["label"] == label)
        return {**row, "name": name, "previous_version": old}

    @r.get("/{name}/diff", response_model=DiffOut)
    def diff(
        name: str,
        a: str = Query(description="A version (3, v3) or a label."),
        b: str = Query(description="A version (3, v3) or a label."),
    ) -> dict[str, Any]:
        """What changed between two versions, as a unified diff of their YAML."""
        va, vb, text = store.compare(name, a, b)
        return {"name": name, "a": va.version, "b": vb.version, "diff": text}

    return r
