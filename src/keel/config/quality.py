"""Quality settings: offline experiments, online evaluators and drift monitors."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from keel.config.alerts import Duration
from keel.config.sections import _Section


class OnlineEvaluatorSettings(_Section):
    name: str = Field(
        min_length=1, max_length=200, description="Score name (shown on traces and in alerts)."
    )
    evaluator: str = Field(description="Evaluator kind (`keel eval evaluators` lists them).")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Options of that evaluator kind."
    )
    sample_rate: float = Field(0.1, ge=0, le=1, description="Share of matching traces scored.")
    models: list[str] = Field(default_factory=list, description="Only these models (empty: all).")
    features: list[str] = Field(
        default_factory=list, description="Only these features (empty: all)."
    )
    include_errors: bool = Field(False, description="Also score failed calls.")
    max_per_day: int | None = Field(
        1000, ge=1, description="Budget cap: most evaluations per UTC day (null: no cap)."
    )
    max_cost_usd_per_day: float | None = Field(
        None, gt=0, description="Budget cap: most judge spend per UTC day (USD)."
    )


class EvalsSettings(_Section):
    gateway_url: str | None = Field(
        None,
        description="Gateway that judges and embedding evaluators call (default: this "
        "process; a worker-only process needs one).",
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding the key for gateway_url."
    )
    concurrency: int = Field(8, ge=1, le=512, description="Items evaluated at once offline.")
    cache_outputs: bool = Field(True, description="Reuse stored outputs for identical calls.")
    online: list[OnlineEvaluatorSettings] = Field(
        default_factory=list, description="Evaluators run on sampled production traces."
    )
    online_interval_s: float = Field(
        5.0, gt=0, description="How often the online evaluator looks for work (seconds)."
    )
    online_concurrency: int = Field(4, ge=1, le=256, description="Online evaluations at once.")
    max_attempts: int = Field(5, ge=1, le=100, description="Tries of one online evaluation.")
    claim_timeout_s: float = Field(
        300.0, gt=0, description="A claimed job not finished by then is reclaimed (seconds)."
    )


class DriftReferenceSettings(_Section):
    kind: Literal["dataset", "period", "last_week"] = Field(
        "last_week", description="dataset version, fixed period, or the same window a week ago."
    )
    dataset: str | None = Field(None, description="NAME@VERSION when kind is dataset.")
    start: str | None = Field(None, description="ISO time, when kind is period.")
    end: str | None = Field(None, description="ISO time, when kind is period.")


class DriftMonitorSettings(_Section):
    name: str = Field(min_length=1, max_length=200, description="Monitor name.")
    window: Duration = Field(3600.0, gt=0, description="Current window (e.g. 1h).")
    interval: Duration = Field(900.0, gt=0, description="How often the monitor runs.")
    reference: DriftReferenceSettings = Field(default_factory=DriftReferenceSettings)
    models: list[str] = Field(default_factory=list, description="Only these models (empty: all).")
    features: list[str] = Field(
        default_factory=list, description="Only these features (empty: all)."
    )


class DriftSettings(_Section):
    features_enabled: bool = Field(
        True, description="Compute drift features (tokens, language, embeddings…) of traces."
    )
    sample_rate: float = Field(1.0, ge=0, le=1, description="Share of traces featurized.")
    embeddings: bool = Field(True, description="Embed inputs and outputs (local-embed).")
    monitors: list[DriftMonitorSettings] = Field(
        default_factory=list, description="Drift monitors: a current window vs a reference."
    )
