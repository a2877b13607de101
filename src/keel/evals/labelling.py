"""Automatic labelling: an evaluator or judge labels production traces on their way into a
dataset version (``keel data from-traces … --label-with NAME``).

``NAME`` is an online evaluator of ``keel.yaml`` (``evals.online``, by name: its
kind and params) or an evaluator kind, with ``--label-params`` JSON (merged over
the configured params when both are given).

Where the label goes, by dataset kind:

- ``chat``: the messages stay as recorded (a valid conversation for fine-tuning);
  the label is in ``metadata.labelled_by``.
- ``eval``: ``expected`` becomes the label (the evaluator's ``label`` when it gives
  one, else its numeric score); the recorded answer moves to ``metadata.output``.

Every labelled row carries ``metadata.labelled_by = {evaluator, kind, judge_model,
prompt (name@version), score, label, passed, reasoning}``; rows the evaluator
could not label are left out and counted. The version's lineage gets a
``label`` step naming the evaluator, its params and the prompt versions used.
Judges call models through the gateway under the feature ``keel:label:<name>``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy.engine import Engine

from keel.config import Settings
from keel.errors import InvalidRequest
from keel.evals.base import Evaluator, ModelClient, Score
from keel.evals.trace_case import FeatureClient, load_traces, trace_case

BATCH = 64


@dataclass
class Labeller:
    name: str
    kind: str
    params: dict[str, Any]
    evaluator: Evaluator
    client: Any = None
    step: dict[str, Any] = field(default_factory=dict)  # lineage; prompts filled in as used


def parse_params(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        v = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"--label-params is not valid JSON: {e}") from None
    if not isinstance(v, dict):
        raise InvalidRequest("--label-params must be a JSON object", param="label_params")
    return v


def _client(settings: Settings, environ: Mapping[str, str]) -> ModelClient:
    from keel.evals.client import HttpModelClient, model_client_for

    if settings.evals.gateway_url:
        return model_client_for(None, settings.evals, environ)
    # No gateway configured for evaluators: the local `keel up` of this configuration.
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return HttpModelClient(f"http://{host}:{settings.port}", environ.get("KEEL_API_KEY"))


def make_labeller(
    settings: Settings,
    name: str,
    params_json: str | None,
    engine: Engine,
    environ: Mapping[str, str] | None = None,
) -> Labeller:
    """The labeller for ``--label-with NAME``; InvalidRequest names what is wrong."""
    from keel.evals.base import EVALUATORS, build_evaluator, validate_evaluator
    from keel.prompts.store import PromptStore

    extra = parse_params(params_json)
    configured = {o.name: o for o in settings.evals.online}
    if name in configured:
        kind, params = configured[name].evaluator, {**configured[name].params, **extra}
    else:
        try:
            validate_evaluator(name, extra)
        except InvalidRequest as e:
            if name in EVALUATORS:
                raise InvalidRequest(f"--label-with {name}: {e.message}") from None
            raise InvalidRequest(
                f"--label-with {name!r}: no online evaluator of that name in evals.online "
                f"({', '.join(sorted(configured)) or 'none configured'}) and no evaluator kind "
                f"of that name ({', '.join(sorted(EVALUATORS))})",
                param="label_with",
            ) from None
        kind, params = name, extra
    cls, _ = validate_evaluator(kind, params)
    if cls.requires_expected:
        raise InvalidRequest(
            f"--label-with {name}: evaluator {kind!r} compares with an expected answer, "
            "which traces do not have"
        )
    client = None
    if cls.uses_model:
        client = FeatureClient(
            _client(settings, environ if environ is not None else os.environ),
            f"keel:label:{name}",
        )
    ev = build_evaluator(kind, params, client, context={"prompt_store": PromptStore(engine)})
    step = {
        "step": "label",
        "params": {
            "evaluator": name,
            "kind": kind,
            "params": params,
            "judge_model": params.get("model") if cls.uses_model else None,
            "prompts": [],
        },
    }
    return Labeller(name, kind, params, ev, client, step)


def _labelled_by(lab: Labeller, score: Score) -> dict[str, Any]:
    d = score.details
    out = {
        "evaluator": lab.name,
        "kind": lab.kind,
        "judge_model": d.get("judge_model") or lab.step["params"]["judge_model"],
        "prompt": d.get("prompt"),
        "score": score.value,
        "label": score.label,
        "passed": score.passed,
    }
    if score.reasoning:
        out["reasoning"] = score.reasoning[:2000]
    return out


def _apply(row: dict[str, Any], dataset_kind: str, by: dict[str, Any]) -> dict[str, Any]:
    meta = dict(row.get("metadata") or {})
    meta["labelled_by"] = by
    out = {**row, "metadata": meta}
    if dataset_kind == "eval":
        meta["output"] = row.get("expected")
        out["expected"] = by["label"] if by["label"] is not None else by["score"]
    return out


async def _label_batch(
    lab: Labeller, engine: Engine, rows: list[dict[str, Any]], concurrency: int
) -> list[Score | None]:
    ids = [(r.get("metadata") or {}).get("trace_id") for r in rows]
    traces = await asyncio.to_thread(load_traces, engine, [i for i in ids if i])
    sem = asyncio.Semaphore(concurrency)

    async def one(tid: str | None) -> Score | None:
        t = traces.get(tid) if tid else None
        case = trace_case(t) if t is not None else None
        if case is None or isinstance(case, str):
            return None
        async with sem:
            try:
                score = await lab.evaluator.evaluate(case)
            except Exception as e:  # one bad row must not stop the dataset
                return Score(value=None, details={"error": f"{type(e).__name__}: {e}"})
        return score

    return await asyncio.gather(*(one(t) for t in ids))


def label_rows(
    lab: Labeller,
    engine: Engine,
    rows: Iterable[dict[str, Any]],
    dataset_kind: str,
    stats: dict[str, int],
    *,
    concurrency: int = 8,
) -> Iterator[dict[str, Any]]:
    """The rows with their labels, streamed in batches of :data:`BATCH`; rows that could
    not be labelled are left out and counted in ``stats["unlabelled"]``."""
    stats.setdefault("labelled", 0)
    stats.setdefault("unlabelled", 0)
    prompts: list[str] = lab.step["params"]["prompts"]
    loop = asyncio.new_event_loop()
    try:
        it = iter(rows)
        while True:
            batch = list(itertools.islice(it, BATCH))
            if not batch:
                break
            scores = loop.run_until_complete(_label_batch(lab, engine, batch, concurrency))
            for row, score in zip(batch, scores, strict=True):
                if score is None or (score.value is None and score.label is None):
                    stats["unlabelled"] += 1
                    continue
                by = _labelled_by(lab, score)
                if by["prompt"] and by["prompt"] not in prompts:
                    prompts.append(by["prompt"])
                stats["labelled"] += 1
                yield _apply(row, dataset_kind, by)
    finally:
        if lab.client is not None and hasattr(lab.client.inner, "aclose"):
            loop.run_until_complete(lab.client.inner.aclose())
        loop.close()
