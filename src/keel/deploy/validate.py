"""Validation: the model's declared eval suite, run against the candidate before it serves.

The suite is the model's ``deploy.models.<name>.eval_suite``. Its first target
is kept for its params (and its prompt) but pointed at the gateway model
``name@VERSION``, which serves the candidate directly without touching the
alias' traffic. When the version pins a prompt, that prompt is rendered (the
version is the prompt with its model and params). The suite's thresholds are
the gates; a suite without thresholds cannot fail, so it fails closed, and so
does a model without a suite unless ``require_validation`` is off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from keel.config import Settings
from keel.deploy.model import Target
from keel.errors import KeelError

log = logging.getLogger("keel.deploy")


@dataclass
class Validation:
    passed: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


def _gates_text(gates: list[dict[str, Any]]) -> str:
    parts = []
    for g in gates:
        v = g.get("value")
        shown = "no value" if v is None else f"{v:.3f}"
        op = "≥" if g.get("passed") else "<"
        parts.append(f"{g['metric']} {shown} {op} {g['threshold']:g}")
    return ", ".join(parts)


async def validate(
    engine: Engine,
    settings: Settings,
    target: Target,
    client_factory: Callable[[], Any],
    *,
    created_by: str,
) -> Validation:
    """Run the model's suite against ``target``; never raises for a bad suite or a failed run."""
    from keel.data.versions import DatasetStore
    from keel.evals.runner import ExperimentRunner, RunnerOptions
    from keel.evals.runs import RunStore
    from keel.evals.suite import TargetSpec, load_suite
    from keel.prompts.store import PromptStore

    deploy = settings.deploy
    ms = deploy.for_model(target.model)
    required = deploy.require_validation if ms.require_validation is None else ms.require_validation
    if not ms.eval_suite:
        if required:
            return Validation(
                False,
                f"no eval suite declared for model '{target.model}': set "
                f"deploy.models.{target.model}.eval_suite (or require_validation: false)",
            )
        return Validation(
            True, "no eval suite declared; validation not required", {"skipped": True}
        )
    try:
        suite = await asyncio.to_thread(load_suite, ms.eval_suite)
    except KeelError as e:
        return Validation(False, f"the eval suite cannot run: {e}", {"suite": ms.eval_suite})
    if not suite.thresholds:
        return Validation(
            False,
            f"the eval suite {ms.eval_suite} declares no thresholds, so nothing could fail it; "
            "add thresholds to gate deployments",
            {"suite": ms.eval_suite},
        )
    first = suite.targets[0]
    spec = TargetSpec(
        name=f"{target.model}-v{target.version}"[:200],
        model=target.ref,
        prompt=target.prompt or first.prompt,
        params=dict(first.params),
    )
    suite = suite.model_copy(update={"targets": [spec]})
    details: dict[str, Any] = {
        "suite": ms.eval_suite,
        "suite_name": suite.name,
        "model": target.ref,
    }
    try:
        client = client_factory()
    except KeelError as e:  # e.g. a worker without evals.gateway_url
        return Validation(False, f"validation cannot call models: {e}", details)
    try:
        runner = ExperimentRunner(
            RunStore(engine),
            DatasetStore(engine, settings.artifact_root),
            PromptStore(engine),
            client,
            RunnerOptions(
                concurrency=suite.concurrency or settings.evals.concurrency,
                use_cache=settings.evals.cache_outputs,
                progress=False,
                created_by=created_by,
            ),
        )
        outcomes = await asyncio.wait_for(runner.run(suite), deploy.validation_timeout_s)
    except TimeoutError:
        return Validation(
            False,
            f"validation did not finish within {deploy.validation_timeout_s:g} s "
            "(deploy.validation_timeout_s)",
            details,
        )
    except KeelError as e:
        return Validation(False, f"the eval suite could not run: {e}", details)
    finally:
        try:
            await client.aclose()
        except Exception:
            log.debug("closing the validation client failed", exc_info=True)
    summary = outcomes[0].summary
    gates = summary.get("gates") or []
    details.update(
        run_id=outcomes[0].run_id,
        gates=gates,
        metrics={k: (v or {}).get("mean") for k, v in (summary.get("metrics") or {}).items()},
        items=outcomes[0].total,
    )
    text = _gates_text(gates)
    if summary.get("passed"):
        return Validation(True, f"eval suite {suite.name} passed: {text}", details)
    return Validation(False, f"eval suite {suite.name} failed: {text}", details)
