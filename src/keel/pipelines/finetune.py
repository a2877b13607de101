"""The built-in ``finetune`` step: an OpenAI-compatible fine-tuning API, end to end.

Upload the training rows as a JSONL file (``POST /files``, purpose
``fine-tune``), create a job (``POST /fine_tuning/jobs``), poll it with
exponential backoff (``GET /fine_tuning/jobs/{id}``) until it succeeds, fails
or is cancelled, and answer the fine-tuned model's name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from keel.errors import InvalidRequest, KeelError

_DONE = ("succeeded", "failed", "cancelled")


class FinetuneFailed(KeelError):
    """The provider refused a request, or the job ended failed/cancelled."""

    status = 502
    type = "finetune_failed"


@dataclass
class FinetuneResult:
    job_id: str
    file_id: str
    status: str
    fine_tuned_model: str | None
    polls: int


def training_lines(rows: Iterable[dict[str, Any]]) -> bytes:
    """Dataset rows as OpenAI fine-tuning JSONL (``{"messages": [...]}`` per line).

    Chat rows keep their messages; completion/eval rows become a user/assistant pair."""
    out = bytearray()
    for row in rows:
        if row.get("messages"):
            msgs = row["messages"]
        else:
            user = row.get("prompt", row.get("input"))
            answer = row.get("completion", row.get("expected"))
            if user is None or answer is None:
                raise InvalidRequest("a training row needs messages, or input and expected")
            text = user if isinstance(user, str) else orjson.dumps(user).decode()
            msgs = [
                {"role": "user", "content": text},
                {"role": "assistant", "content": str(answer)},
            ]
        out += orjson.dumps({"messages": msgs}) + b"\n"
    if not out:
        raise InvalidRequest("the training dataset has no rows")
    return bytes(out)


def _check(r: httpx.Response, what: str) -> dict[str, Any]:
    if r.status_code >= 400:
        try:
            msg = (r.json().get("error") or {}).get("message") or r.text[:300]
        except ValueError:
            msg = r.text[:300]
        raise FinetuneFailed(f"{what}: the provider answered HTTP {r.status_code}: {msg}")
    return r.json()


def run_finetune(
    base_url: str,
    api_key: str | None,
    training: bytes,
    *,
    model: str,
    suffix: str | None = None,
    hyperparameters: dict[str, Any] | None = None,
    poll_s: float = 5.0,
    max_poll_s: float = 60.0,
    timeout_s: float = 24 * 3600.0,
    log: Callable[[str], None] = lambda m: None,
    transport: httpx.BaseTransport | None = None,
) -> FinetuneResult:
    """Upload, create the job, poll until it is done; raise :class:`FinetuneFailed` unless
    it succeeded. ``base_url`` ends with ``/v1`` like a provider's."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(
        base_url=base_url.rstrip("/"), headers=headers, timeout=60, transport=transport
    ) as http:
        try:
            f = _check(
                http.post(
                    "/files",
                    data={"purpose": "fine-tune"},
                    files={"file": ("train.jsonl", training, "application/jsonl")},
                ),
                "upload",
            )
            log(f"uploaded {len(training)} bytes as {f['id']}")
            body: dict[str, Any] = {"model": model, "training_file": f["id"]}
            if suffix:
                body["suffix"] = suffix
            if hyperparameters:
                body["hyperparameters"] = hyperparameters
            job = _check(http.post("/fine_tuning/jobs", json=body), "create job")
            log(f"job {job['id']} created ({job.get('status')})")
            deadline = time.monotonic() + timeout_s
            delay, polls = poll_s, 0
            while job.get("status") not in _DONE:
                if time.monotonic() > deadline:
                    raise FinetuneFailed(
                        f"job {job['id']} still {job.get('status')} after {timeout_s:.0f}s"
                    )
                time.sleep(delay)
                delay = min(max_poll_s, delay * 2)  # backoff: long jobs poll rarely
                job = _check(http.get(f"/fine_tuning/jobs/{job['id']}"), "poll job")
                polls += 1
                log(f"job {job['id']}: {job.get('status')}")
        except httpx.HTTPError as e:
            raise FinetuneFailed(f"cannot reach the fine-tuning API at {base_url} ({e})") from None
    if job["status"] != "succeeded":
        err = job.get("error") or {}
        raise FinetuneFailed(
            f"fine-tuning job {job['id']} {job['status']}: "
            f"{err.get('message') or err.get('code') or 'no reason given'}"
        )
    if not job.get("fine_tuned_model"):
        raise FinetuneFailed(f"fine-tuning job {job['id']} succeeded without a model name")
    return FinetuneResult(job["id"], f["id"], job["status"], job["fine_tuned_model"], polls)
