"""Quality settings: offline experiments, online evaluators and drift monitors."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import Field, model_validator

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
    retry_backoff_s: float = Field(
        5.0, gt=0, description="First retry delay of a failed online evaluation (then doubles)."
    )
    retry_backoff_max_s: float = Field(
        600.0, gt=0, description="Longest delay between retries of an online evaluation."
    )
    online_batch_size: int = Field(
        5000, ge=1, le=100_000, description="Most traces the online scheduler looks at per tick."
    )
    online_settle_s: float = Field(
        10.0,
        ge=0,
        description="Traces are scheduled once this old (seconds), so calls still being "
        "written are not passed over; slower calls are caught up later.",
    )
    online_backfill_s: float = Field(
        300.0, ge=0, description="On its very first run, the scheduler also looks this far back."
    )
    online_job_days: int = Field(
        7, ge=1, description="Finished online evaluation jobs are deleted after this many days."
    )

    @model_validator(mode="after")
    def _unique_online(self) -> EvalsSettings:
        names = [o.name for o in self.online]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"online: duplicate evaluator name(s) {', '.join(dupes)}")
        return self


def _iso_ms(value: str, field: str) -> int:
    """Epoch ms of an ISO 8601 time (UTC when it names no zone)."""
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{field}: {value!r} is not an ISO 8601 time (e.g. 2026-01-31T12:00:00Z)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


#: The drift features a monitor can compare (``columns``), by kind.
DRIFT_NUMERIC = (
    "input_tokens",
    "output_tokens",
    "latency_ms",
    "retrieval_top_score",
    "retrieval_count",
)
DRIFT_CATEGORICAL = ("language", "refusal", "model")
DRIFT_EMBEDDING = ("input_embedding", "output_embedding")
DRIFT_COLUMNS = (*DRIFT_NUMERIC, *DRIFT_CATEGORICAL, *DRIFT_EMBEDDING)


class DriftReferenceSettings(_Section):
    kind: Literal["dataset", "period", "last_week"] = Field(
        "last_week", description="dataset version, fixed period, or the same window a week ago."
    )
    dataset: str | None = Field(None, description="NAME@VERSION when kind is dataset.")
    start: str | None = Field(None, description="ISO time, when kind is period.")
    end: str | None = Field(None, description="ISO time, when kind is period.")

    @model_validator(mode="after")
    def _complete(self) -> DriftReferenceSettings:
        if self.kind == "dataset" and not (self.dataset or "").strip():
            raise ValueError("kind 'dataset' needs `dataset: NAME@VERSION` (or NAME: its latest)")
        if self.kind != "dataset" and self.dataset is not None:
            raise ValueError(
                f"`dataset` is only used when kind is 'dataset' (kind is {self.kind!r})"
            )
        if self.kind == "period":
            if not self.start or not self.end:
                raise ValueError("kind 'period' needs both `start` and `end` (ISO 8601 times)")
            if _iso_ms(self.start, "start") >= _iso_ms(self.end, "end"):
                raise ValueError(f"`start` ({self.start}) must be before `end` ({self.end})")
        elif self.start is not None or self.end is not None:
            raise ValueError(f"`start`/`end` are only used when kind is 'period' ({self.kind!r})")
        return self

    def period_ms(self) -> tuple[int, int]:
        """[start, end) of a ``period`` reference, in epoch ms."""
        assert self.start and self.end
        return _iso_ms(self.start, "start"), _iso_ms(self.end, "end")


class DriftMonitorSettings(_Section):
    name: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Monitor name (letters, digits, _ . : -).",
    )
    window: Duration = Field(3600.0, gt=0, description="Current window (e.g. 1h).")
    interval: Duration = Field(900.0, gt=0, description="How often the monitor runs.")
    reference: DriftReferenceSettings = Field(default_factory=DriftReferenceSettings)
    models: list[str] = Field(default_factory=list, description="Only these models (empty: all).")
    features: list[str] = Field(
        default_factory=list, description="Only these features (empty: all)."
    )
    columns: list[str] = Field(
        default_factory=list,
        description="Only these drift features, e.g. [input_tokens, language, input_embedding] "
        "(empty: all).",
    )
    min_samples: int | None = Field(
        None, ge=2, description="Override of drift.min_samples for this monitor."
    )

    @model_validator(mode="after")
    def _known_columns(self) -> DriftMonitorSettings:
        bad = [c for c in self.columns if c not in DRIFT_COLUMNS]
        if bad:
            raise ValueError(
                f"columns: unknown drift feature(s) {', '.join(map(repr, bad))} "
                f"(known: {', '.join(DRIFT_COLUMNS)})"
            )
        return self


class DriftSettings(_Section):
    features_enabled: bool = Field(
        True, description="Compute drift features (tokens, language, embeddings…) of traces."
    )
    sample_rate: float = Field(1.0, ge=0, le=1, description="Share of traces featurized.")
    embeddings: bool = Field(True, description="Embed inputs and outputs (local-embed).")
    monitors: list[DriftMonitorSettings] = Field(
        default_factory=list, description="Drift monitors: a current window vs a reference."
    )
    scan_interval_s: float = Field(
        10.0, gt=0, description="How often the featurizer looks for new traces (seconds)."
    )
    scan_delay_s: float = Field(
        180.0,
        ge=0,
        description="Traces that started less than this ago wait for the next scan: a call is "
        "recorded when it ends, up to the gateway timeout after it started (seconds).",
    )
    backfill: Duration = Field(
        8 * 86400.0,
        ge=0,
        description="On first start, traces up to this old are featurized (older history is "
        "not: embedding it all would take long).",
    )
    batch_size: int = Field(256, ge=1, le=10_000, description="Traces featurized per transaction.")
    embed_batch: int = Field(64, ge=1, le=64, description="Texts embedded per encoder call.")
    max_text_chars: int = Field(
        2000, ge=16, description="Characters of an input or output that are embedded and read."
    )
    example_chars: int = Field(
        300, ge=0, description="Characters of each input kept for the examples in reports."
    )
    alpha: float = Field(
        0.01,
        gt=0,
        lt=0.5,
        description="False-positive budget of a whole run: each of its m tests is held to "
        "alpha/m (Bonferroni).",
    )
    min_samples: int = Field(
        50, ge=2, description="Fewest traces per side for a comparison (else: insufficient data)."
    )
    psi_threshold: float = Field(
        0.2, gt=0, description="Numeric features: PSI at or above this is a material shift."
    )
    js_threshold: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Categories and topics: Jensen-Shannon distance at or above this is material.",
    )
    wasserstein_threshold: float = Field(
        0.5, gt=0, description="Wasserstein distance / reference IQR shown as moved (report only)."
    )
    clusters: int = Field(8, ge=2, le=64, description="Topics (k-means clusters) of a reference.")
    far_margin: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Topics: drifted when the share of inputs far from every reference topic "
        "exceeds the reference's by this much.",
    )
    mmd_sample: int = Field(
        500, ge=20, le=5000, description="Most embeddings per side in the MMD test."
    )
    permutations: int = Field(
        500,
        ge=50,
        le=10_000,
        description="Permutations of the MMD test (raised when needed so p can reach alpha/m).",
    )
    cluster_sample: int = Field(
        1000, ge=50, description="Most reference embeddings the topics are fitted on."
    )
    max_rows: int = Field(200_000, ge=100, description="Most traces read per window (the newest).")
    embedding_rows: int = Field(
        2000, ge=50, description="Most embeddings read per window (a random sample)."
    )
    dataset_rows: int = Field(
        5000, ge=50, description="Most rows of a dataset reference that are featurized."
    )

    @model_validator(mode="after")
    def _unique_monitors(self) -> DriftSettings:
        names = [m.name for m in self.monitors]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"monitors: duplicate name(s) {', '.join(dupes)}")
        return self
