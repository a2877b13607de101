"""The OpenAI fine-tuning endpoints of the fake upstream (files and jobs).

``POST /v1/files`` (multipart: ``file``, ``purpose``), ``POST
/v1/fine_tuning/jobs`` and ``GET /v1/fine_tuning/jobs/{id}``. A job moves one
state per poll: ``queued`` → ``running`` → ``succeeded`` (with
``fine_tuned_model = "ft:<model>:<suffix>:<job id>"``). A model or suffix that
contains ``ft_fail`` makes the job end ``failed`` with an error instead.
"""

from __future__ import annotations

import itertools
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

_STATES = ("queued", "running")


def _error(status: int, msg: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": msg, "type": "invalid_request_error", "param": param}}
    return JSONResponse(body, status_code=status)


def _multipart(ctype: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """``{field: (filename, bytes)}`` of a multipart/form-data body (stdlib parser)."""
    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw
    )
    out: dict[str, tuple[str | None, bytes]] = {}
    if not msg.is_multipart():
        return out
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            out[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return out


class FineTuning:
    """In-memory files and jobs; ``files``/``jobs`` are public for assertions."""

    def __init__(self) -> None:
        self.files: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/files", self.upload, methods=["POST"]),
            Route("/v1/fine_tuning/jobs", self.create, methods=["POST"]),
            Route("/v1/fine_tuning/jobs/{job_id}", self.get, methods=["GET"]),
        ]

    async def upload(self, request: Request) -> JSONResponse:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return _error(400, "send multipart/form-data with file and purpose")
        form = _multipart(ctype, await request.body())
        if "file" not in form:
            return _error(400, "missing file", "file")
        purpose = form.get("purpose", (None, b""))[1].decode()
        if purpose != "fine-tune":
            return _error(400, f"unsupported purpose {purpose!r}", "purpose")
        fname, data = form["file"]
        lines = [ln for ln in data.splitlines() if ln.strip()]
        try:
            for ln in lines:
                orjson.loads(ln)
        except orjson.JSONDecodeError:
            return _error(400, "the file is not JSONL", "file")
        fid = f"file-{next(self._ids):06d}"
        self.files[fid] = {"id": fid, "object": "file", "bytes": len(data),
                           "filename": fname, "purpose": purpose, "lines": len(lines),
                           "content": data}  # fmt: skip
        return JSONResponse({k: v for k, v in self.files[fid].items() if k != "content"})

    async def create(self, request: Request) -> JSONResponse:
        body = orjson.loads(await request.body() or b"{}")
        model, tf = body.get("model"), body.get("training_file")
        if not model:
            return _error(400, "model is required", "model")
        if tf not in self.files:
            return _error(400, f"no file {tf!r}", "training_file")
        jid = f"ftjob-{next(self._ids):06d}"
        self.jobs[jid] = {
            "id": jid, "object": "fine_tuning.job", "model": model, "training_file": tf,
            "suffix": body.get("suffix"), "hyperparameters": body.get("hyperparameters") or {},
            "status": "queued", "fine_tuned_model": None, "error": None, "polls": 0,
        }  # fmt: skip
        return JSONResponse(self._public(jid))

    async def get(self, request: Request) -> JSONResponse:
        jid = request.path_params["job_id"]
        job = self.jobs.get(jid)
        if job is None:
            return _error(404, f"no fine-tuning job {jid!r}")
        job["polls"] += 1
        if job["status"] in _STATES:
            if job["status"] == "queued":
                job["status"] = "running"
            elif "ft_fail" in f"{job['model']}:{job['suffix'] or ''}":
                job["status"] = "failed"
                job["error"] = {"code": "invalid_training_file", "message": "fake failure"}
            else:
                job["status"] = "succeeded"
                job["fine_tuned_model"] = f"ft:{job['model']}:{job['suffix'] or 'keel'}:{jid}"
        return JSONResponse(self._public(jid))

    def _public(self, jid: str) -> dict[str, Any]:
        return {k: v for k, v in self.jobs[jid].items() if k != "polls"}
