"""Section settings of :class:`keel.config.Settings`: gateway, recorder, models, auth…"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

ENV_PREFIX = "KEEL_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GatewaySettings(_Section):
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body accepted (bytes); larger → 413."
    )
    default_timeout_s: float = Field(
        120.0, gt=0, description="Upstream read timeout when a provider sets none (seconds)."
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, description="Upstream connect timeout when a provider sets none (seconds)."
    )
    max_connections: int = Field(512, ge=1, description="Pooled upstream connections per provider.")


class RecorderSettings(_Section):
    queue_size: int = Field(
        100_000, ge=10, description="Traces held in memory before new ones spill to disk."
    )
    batch_size: int = Field(1000, ge=1, description="Most traces written in one transaction.")
    flush_interval_s: float = Field(
        0.25, gt=0, le=60, description="Longest a trace waits in the queue before a write."
    )
    capture_bodies: bool = Field(
        True, description="Store request and response bodies (false: metadata and tokens only)."
    )
    max_body_chars: int = Field(
        200_000, ge=0, description="Bodies longer than this are truncated in the store (marked)."
    )
    replay_interval_s: float = Field(
        5.0, gt=0, description="How often spilled traces are retried against the store."
    )


class LocalSettings(_Section):
    enabled: bool = Field(
        True, description="Serve the embedded models `local` and `local-embed` (CPU, no key)."
    )
    threads: int = Field(2, ge=1, le=256, description="CPU threads for local generation.")
    context_size: int = Field(2048, ge=256, description="Context window of the local model.")
    max_tokens: int = Field(
        256, ge=1, description="Default `max_tokens` for the local model when a call sets none."
    )
    chat_model_path: str | None = Field(
        None, description="A GGUF file to serve as `local` instead of the bundled SmolLM2-135M."
    )
    embed_model_dir: str | None = Field(
        None, description="A sentence-transformers BERT directory instead of all-MiniLM-L6-v2."
    )


class MonitoringSettings(_Section):
    sample_interval_s: float = Field(
        10.0, gt=0, description="How often CPU, memory, GPU and event-loop lag are sampled."
    )
    probe_interval_s: float = Field(
        30.0, gt=0, description="How often each component is probed (unless it sets its own)."
    )
    probe_timeout_s: float = Field(5.0, gt=0, description="Default timeout of one probe.")
    probe_providers: bool = Field(
        True, description="Probe every provider of the gateway as a component automatically."
    )
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics at /metrics.")


class RetentionSettings(_Section):
    days: int = Field(30, ge=1, description="Raw traces and spans older than this are deleted.")
    rollup_days: int = Field(400, ge=1, description="Rollups older than this are deleted.")
    interval_s: float = Field(3600.0, gt=0, description="How often retention runs.")
    batch_size: int = Field(
        5000, ge=100, description="Rows deleted per transaction (keeps locks short)."
    )


ComponentKind = Literal["http", "tcp", "openai", "qdrant", "chroma", "pgvector", "redis"]


class ComponentSettings(_Section):
    """Something the application depends on, and how to check that it answers."""

    name: str = Field(min_length=1, max_length=200, description="Shown in the API and metrics.")
    kind: ComponentKind = Field(description="Probe type.")
    url: str | None = Field(
        None,
        description="http/qdrant/chroma/openai: base URL; redis: redis://…; "
        "pgvector: postgresql://…",
    )
    host: str | None = Field(None, description="tcp: host.")
    port: int | None = Field(None, ge=1, le=65535, description="tcp: port.")
    expected_status: int = Field(200, ge=100, le=599, description="http: expected status.")
    timeout_s: float | None = Field(None, gt=0, description="Probe timeout (seconds).")
    interval_s: float | None = Field(None, gt=0, description="Probe interval (seconds).")
    api_key_env: str | None = Field(
        None, description="Environment variable with a key sent by openai/qdrant probes."
    )
    model: str | None = Field(None, description="openai: model for the tiny probe request.")
    collection: str | None = Field(
        None, description="qdrant/chroma: a collection that must exist; pgvector: a table."
    )

    @model_validator(mode="after")
    def _needs(self) -> ComponentSettings:
        if self.kind == "tcp":
            if not self.host or not self.port:
                raise ValueError("a tcp component needs host and port")
        elif not self.url:
            raise ValueError(f"a {self.kind} component needs url")
        return self


ProviderKind = Literal["openai", "anthropic", "local"]


class ProviderSettings(_Section):
    kind: ProviderKind = Field(description="Adapter: openai (any compatible server), anthropic.")
    base_url: str | None = Field(
        None, description="API base URL, e.g. https://api.openai.com/v1 or http://vllm:8000/v1."
    )
    api_key_env: str | None = Field(
        None,
        description="Name of the environment variable holding the API key (never the key itself).",
    )
    timeout_s: float | None = Field(None, gt=0, description="Read timeout (seconds).")
    connect_timeout_s: float | None = Field(None, gt=0, description="Connect timeout (seconds).")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra headers sent upstream."
    )
    anthropic_version: str = Field("2023-06-01", description="anthropic-version header.")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/") if v else v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or not v.replace("_", "").isalnum() or v[0].isdigit()):
            raise ValueError(
                "must be the NAME of an environment variable (letters, digits, _), "
                "not the key itself"
            )
        return v

    @model_validator(mode="after")
    def _needs_url(self) -> ProviderSettings:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("base_url is required for kind 'openai'")
        return self


class DeploymentSettings(_Section):
    provider: str = Field(description="Name of a provider under `providers:`.")
    model: str = Field(description="The model name the upstream knows.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Defaults merged into each request (caller wins)."
    )
    weight: float = Field(1.0, gt=0, description="Share of traffic among the alias' deployments.")
    timeout_s: float | None = Field(
        None, gt=0, description="Read timeout for this deployment (default: its provider's)."
    )


def _shorthand_deployment(v: Any) -> Any:
    # "openai/gpt-4o-mini" is accepted for a one-deployment alias.
    if isinstance(v, str):
        provider, sep, model = v.partition("/")
        if not sep or not provider or not model:
            raise ValueError("a shorthand deployment is written 'provider/model'")
        return {"deployments": [{"provider": provider, "model": model}]}
    return v


class CircuitBreakerSettings(_Section):
    failures: int = Field(5, ge=1, description="Consecutive failures that open the circuit.")
    cooldown_s: float = Field(30.0, gt=0, description="How long an open circuit stays open.")


class ModelAliasSettings(_Section):
    deployments: list[DeploymentSettings] = Field(min_length=1)
    kind: Literal["chat", "embedding"] = Field("chat", description="What the alias serves.")
    strategy: Literal["weighted", "least-busy", "fallback"] = Field(
        "weighted",
        description="weighted: random by weight; least-busy: fewest calls in flight; "
        "fallback: the first healthy deployment, in order.",
    )
    retries: int = Field(
        1,
        ge=0,
        le=10,
        description="Extra tries on a retryable failure (connect error, timeout, 429, 5xx), "
        "each on the next deployment when there is one.",
    )
    retry_backoff_s: float = Field(0.2, ge=0, description="First retry delay; doubles.")
    circuit_breaker: CircuitBreakerSettings = Field(default_factory=CircuitBreakerSettings)
    rpm: int | None = Field(
        None, ge=1, description="Requests per minute for this model (all keys)."
    )
    tpm: int | None = Field(None, ge=1, description="Tokens per minute for this model (all keys).")
    cache_ttl_s: float | None = Field(
        None, gt=0, description="Cache exact-match responses this long (off when unset)."
    )
    capture: Literal["full", "redacted", "metadata-only"] | None = Field(
        None, description="What is stored of bodies (default: redaction.default_capture)."
    )


class AuthSettings(_Section):
    enabled: Literal["auto", "on", "off"] = Field(
        "auto", description="Require virtual keys; auto: on when `host` is not a loopback address."
    )
    admin_key_env: str | None = Field(
        "KEEL_ADMIN_KEY",
        description="Environment variable holding a bootstrap admin key (optional).",
    )
    key_cache_s: float = Field(
        5.0,
        ge=0,
        description="How long a replica trusts a verified key without Redis "
        "(with Redis, revocations reach every replica at once).",
    )


class LimitsSettings(_Section):
    redis_failure: Literal["open", "closed"] = Field(
        "open",
        description="Redis unreachable → open: keep serving with per-process limits; "
        "closed: refuse calls (503).",
    )


class RedactionSettings(_Section):
    default_capture: Literal["full", "redacted", "metadata-only"] = Field(
        "full", description="What is stored of bodies for aliases that set no `capture`."
    )
    patterns: dict[str, str] = Field(
        default_factory=dict, description="Extra regexes to redact, by name (e.g. ticket ids)."
    )

    @field_validator("patterns")
    @classmethod
    def _compile(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        for name, rx in v.items():
            try:
                re.compile(rx)
            except re.error as e:
                raise ValueError(f"{name}: not a valid regular expression: {e}") from None
        return v


class DataSettings(_Section):
    artifact_root: str | None = Field(
        None,
        description="Where dataset versions (Parquet) and artifacts go: a path or an fsspec "
        "URL (s3://…, gs://…, file://…); default <data_dir>/artifacts.",
    )
    checks: list[str] = Field(
        default_factory=list,
        description="Extra validation checks, as 'package.module:function' to import.",
    )
    near_duplicate_threshold: float = Field(
        0.85, gt=0, le=1, description="Jaccard similarity above which rows are near duplicates."
    )


class PromptSettings(_Section):
    cache_dir: str | None = Field(
        None, description="SDK: where fetched prompts are cached (default ~/.cache/keel/prompts)."
    )
