"""Every Keel setting, declared once.

A setting has a name, a type, a default and a doc (the pydantic field), a place
in ``keel.yaml`` (its path) and an environment variable: ``KEEL_<FIELD>`` for
top-level fields, ``KEEL_<SECTION>_<FIELD>`` for fields of a section. The
precedence is: command-line flag > environment > keel.yaml > default.

Only ``app.py`` and ``cli.py`` call :func:`load_settings`; everything else gets
the parts of :class:`Settings` it needs as arguments.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from keel.errors import ConfigError

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


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(v: Any) -> float:
    """``30s``, ``5m``, ``2h``, ``1d``, ``1w`` or a number of seconds → seconds."""
    if isinstance(v, bool):
        raise ValueError("a duration is a number of seconds or a string like 30s, 5m, 2h, 1d")
    if isinstance(v, int | float):
        seconds = float(v)
    elif isinstance(v, str) and v.strip():
        t = v.strip().lower()
        unit = _DURATION_UNITS.get(t[-1])
        try:
            seconds = float(t[:-1]) * unit if unit else float(t)
        except ValueError:
            raise ValueError(
                f"{v!r} is not a duration (use a number of seconds or 30s, 5m, 2h, 1d, 1w)"
            ) from None
    else:
        raise ValueError("a duration is a number of seconds or a string like 30s, 5m, 2h, 1d")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]

ChannelKind = Literal["slack", "webhook", "email", "pagerduty"]


class ChannelSettings(_Section):
    """Where alert notifications go. Secrets are named by environment variable."""

    kind: ChannelKind = Field(description="slack, webhook, email or pagerduty.")
    url: str | None = Field(None, description="slack/webhook/pagerduty: the URL to POST to.")
    url_env: str | None = Field(
        None, description="…or the environment variable holding it (Slack webhook URLs are secret)."
    )
    secret_env: str | None = Field(
        None, description="webhook: env var with an HMAC-SHA256 key; signs X-Keel-Signature."
    )
    routing_key_env: str | None = Field(
        None, description="pagerduty: env var with the routing key."
    )
    headers: dict[str, str] = Field(default_factory=dict, description="webhook: extra headers.")
    smtp_host: str | None = Field(None, description="email: SMTP server.")
    smtp_port: int = Field(587, ge=1, le=65535, description="email: SMTP port.")
    starttls: bool = Field(True, description="email: upgrade with STARTTLS.")
    ssl: bool = Field(False, description="email: implicit TLS (port 465).")
    username: str | None = Field(None, description="email: SMTP user.")
    password_env: str | None = Field(None, description="email: env var with the SMTP password.")
    sender: str | None = Field(None, description="email: From address.")
    to: list[str] = Field(default_factory=list, description="email: recipients.")
    timeout_s: float = Field(10.0, gt=0, description="Timeout of one delivery attempt.")

    @model_validator(mode="after")
    def _needs(self) -> ChannelSettings:
        if self.kind in ("slack", "webhook") and not (self.url or self.url_env):
            raise ValueError(f"a {self.kind} channel needs url or url_env")
        if self.kind == "pagerduty" and not self.routing_key_env:
            raise ValueError("a pagerduty channel needs routing_key_env")
        if self.kind == "email":
            if not self.smtp_host or not self.sender or not self.to:
                raise ValueError("an email channel needs smtp_host, sender and to")
            if self.ssl and self.starttls:
                raise ValueError("choose ssl (implicit TLS) or starttls, not both")
        for url in (self.url,):
            if url is not None and not url.startswith(("http://", "https://")):
                raise ValueError("url must start with http:// or https://")
        return self


class ConditionSettings(_Section):
    """When a signal's value is a problem."""

    op: Literal["above", "below"] = Field(description="Fire when the value is above/below.")
    threshold: float = Field(description="The limit (for change: a percentage).")
    mode: Literal["value", "change", "rate"] = Field(
        "value",
        description="value: the signal itself; change: % change against the same window "
        "`compare_to` earlier; rate: change per minute against the previous window.",
    )
    compare_to: Duration = Field(
        86400.0, gt=0, description="change: how far back the comparison window is (1d, 7d)."
    )


class RuleSettings(_Section):
    name: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Unique name (letters, digits, _ . : -).",
    )
    signal: str = Field(description="A registered signal (`keel alerts signals` lists them).")
    condition: ConditionSettings
    window: Duration = Field(300.0, gt=0, description="The window the signal is computed over.")
    for_: Duration = Field(
        0.0, alias="for", description="How long the condition must hold before firing."
    )
    severity: Literal["info", "warning", "critical"] = Field("warning", description="Severity.")
    channels: list[str] = Field(default_factory=list, description="Channel names to notify.")
    filters: dict[str, str] = Field(
        default_factory=dict, description="Only this model/provider/feature/user/component…"
    )
    group_by: list[str] = Field(
        default_factory=list, description="One alert per value of these labels (e.g. [model])."
    )
    description: str | None = Field(None, description="What this means and what to do.")
    runbook_url: str | None = Field(None, description="A link for whoever is paged.")
    enabled: bool = Field(True, description="Evaluate this rule.")

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class AlertsSettings(_Section):
    evaluation_interval_s: float = Field(15.0, gt=0, description="How often rules are evaluated.")
    renotify_interval_s: float = Field(
        4 * 3600.0, gt=0, description="Re-send a still-firing alert this often."
    )
    dashboard_url: str | None = Field(
        None, description="Public base URL of Keel, for links in messages (default: host:port)."
    )
    delivery_attempts: int = Field(4, ge=1, le=20, description="Tries per notification.")
    delivery_backoff_s: float = Field(
        2.0, gt=0, description="First retry delay; doubles each attempt."
    )
    channels: dict[str, ChannelSettings] = Field(
        default_factory=dict, description="Notification channels, by name."
    )
    rules: list[RuleSettings] = Field(default_factory=list, description="Alert rules.")

    @model_validator(mode="after")
    def _refs(self) -> AlertsSettings:
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"alerts.rules: duplicate rule name(s) {', '.join(dupes)}")
        for i, r in enumerate(self.rules):
            for ch in r.channels:
                if ch not in self.channels:
                    raise ValueError(
                        f"alerts.rules.{i} ({r.name}).channels: unknown channel '{ch}' "
                        f"(known: {', '.join(sorted(self.channels)) or 'none'})"
                    )
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


class BudgetSettings(_Section):
    name: str = Field(min_length=1, max_length=200, description="Shown in errors and alerts.")
    scope: Literal["global", "key", "user", "feature"] = Field(description="What is counted.")
    match: str = Field("*", description="Which key/user/feature ('*': each one separately).")
    limit_usd: float = Field(gt=0, description="Spend allowed per period (USD).")
    period: Literal["day", "week", "month"] = Field("month", description="Resets at UTC start.")
    mode: Literal["hard", "soft"] = Field(
        "hard", description="hard: refuse calls (429) once spent; soft: alert only."
    )


class PriceTier(_Section):
    above_tokens: int = Field(ge=0, description="Prompts longer than this use this tier.")
    input_per_mtok: float = Field(ge=0, description="USD per million input tokens in this tier.")
    output_per_mtok: float = Field(ge=0, description="USD per million output tokens in this tier.")


class PriceSettings(_Section):
    provider: str = Field(description="Provider kind (openai, anthropic) or a provider name.")
    model: str = Field(description="Upstream model name.")
    input_per_mtok: float = Field(0.0, ge=0, description="USD per million input tokens.")
    output_per_mtok: float = Field(0.0, ge=0, description="USD per million output tokens.")
    cached_input_per_mtok: float | None = Field(None, ge=0, description="Cache reads.")
    cache_write_per_mtok: float | None = Field(None, ge=0, description="Cache writes.")
    reasoning_per_mtok: float | None = Field(
        None, ge=0, description="Reasoning tokens (default: the output price)."
    )
    per_request: float = Field(0.0, ge=0, description="USD per call.")
    gpu_hour_usd: float | None = Field(
        None, ge=0, description="Self-hosted: USD per GPU-hour, charged by call duration."
    )
    batch_discount: float = Field(0.0, ge=0, le=1, description="Share off for batch calls.")
    effective_from: str | None = Field(
        None, description="YYYY-MM-DD: from when this price applies (older traces keep theirs)."
    )
    tiers: list[PriceTier] = Field(default_factory=list, description="Context-length tiers.")


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


class Settings(_Section):
    """The whole configuration. ``keel config check`` validates exactly this."""

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(4000, ge=1, le=65535, description="Port to listen on.")
    data_dir: str = Field(".keel", description="Where SQLite, spill files and artifacts live.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the store; default sqlite:///<data_dir>/keel.db. "
        "postgresql://… for the shared store.",
    )
    redis_url: str | None = Field(
        None,
        description="Redis (redis://host:6379/0) for rate limits, budgets, the response "
        "cache and key revocations shared across replicas; in-process without it.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    recorder: RecorderSettings = Field(default_factory=RecorderSettings)
    local: LocalSettings = Field(default_factory=LocalSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    alerts: AlertsSettings = Field(default_factory=AlertsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    prompts: PromptSettings = Field(default_factory=PromptSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    redaction: RedactionSettings = Field(default_factory=RedactionSettings)
    budgets: list[BudgetSettings] = Field(
        default_factory=list, description="Spend limits per period (USD)."
    )
    prices: list[PriceSettings] = Field(
        default_factory=list, description="Prices added to or overriding the shipped catalog."
    )
    components: list[ComponentSettings] = Field(
        default_factory=list, description="What the application depends on, with a probe each."
    )
    providers: dict[str, ProviderSettings] = Field(
        default_factory=dict, description="Upstream LLM servers, by name."
    )
    models: dict[str, Annotated[ModelAliasSettings, BeforeValidator(_shorthand_deployment)]] = (
        Field(default_factory=dict, description="Public model names → deployments.")
    )

    @field_validator("database_url")
    @classmethod
    def _db_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v.startswith("postgres://"):
            v = "postgresql://" + v[len("postgres://") :]
        if v.startswith("postgresql://"):
            # psycopg 3 is the driver Keel installs.
            v = "postgresql+psycopg://" + v[len("postgresql://") :]
        if not v.startswith(("sqlite:", "postgresql+psycopg:")):
            raise ValueError("must be sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
        return v

    @model_validator(mode="after")
    def _references(self) -> Settings:
        reserved = {"local"} if self.local.enabled else set()
        for name in self.providers:
            if name in reserved:
                raise ValueError(
                    f"providers.{name}: the name 'local' is reserved for the embedded model"
                )
        names = [c.name for c in self.components]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"components: duplicate name(s) {', '.join(dupes)}")
        known = set(self.providers) | reserved
        for alias, spec in self.models.items():
            for i, dep in enumerate(spec.deployments):
                if dep.provider not in known:
                    raise ValueError(
                        f"models.{alias}.deployments.{i}.provider: unknown provider "
                        f"'{dep.provider}' (known: {', '.join(sorted(known)) or 'none'})"
                    )
        return self

    @property
    def artifact_root(self) -> str:
        return self.data.artifact_root or str(Path(self.data_dir).resolve() / "artifacts")

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{Path(self.data_dir).resolve() / 'keel.db'}"


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """Collect KEEL_* variables into the nested shape of :class:`Settings`."""
    out: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, _Section):
            for sub, sf in ann.model_fields.items():
                if not _scalar(sf.annotation):
                    continue
                key = f"{ENV_PREFIX}{name}_{sub}".upper()
                if key in environ:
                    out.setdefault(name, {})[sub] = environ[key]
        elif name not in _YAML_ONLY:
            key = f"{ENV_PREFIX}{name}".upper()
            if key in environ:
                out[name] = environ[key]
    return out


_YAML_ONLY = ("providers", "models", "components", "budgets", "prices")


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return repr(field.default_factory())
    return repr(field.default)


def _scalar(ann: Any) -> bool:
    """True for settings an environment variable can carry (not lists or mappings)."""
    text = str(ann)
    return not any(t in text for t in ("dict", "list", "Settings"))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} invalid setting(s)"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; `keel config reference` lists them all)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return data


def load_settings(
    config_path: str | Path | None = None,
    *,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Build :class:`Settings` from a YAML file, the environment and overrides.

    ``config_path`` None means ``$KEEL_CONFIG`` or ``./keel.yaml`` when present.
    Raises :class:`ConfigError` listing every invalid entry by its path.
    """
    env = dict(os.environ if environ is None else environ)
    data: dict[str, Any] = {}
    source = "defaults"
    if config_path is None:
        config_path = env.get("KEEL_CONFIG")
        if config_path is None and Path("keel.yaml").exists():
            config_path = "keel.yaml"
    elif not Path(config_path).exists():
        raise ConfigError(f"config file {config_path} does not exist")
    if config_path is not None:
        data = read_yaml(Path(config_path))
        source = str(config_path)
    data = _merge(data, _env_overrides(env))
    data = _merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def reference_rows() -> list[tuple[str, str, str, str, str]]:
    """(yaml path, env var, type, default, doc) for every scalar setting."""
    rows: list[tuple[str, str, str, str, str]] = []

    def typename(ann: Any) -> str:
        return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")

    for name, field in Settings.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, _Section):
            for sub, sf in ann.model_fields.items():
                if not _scalar(sf.annotation):
                    rows.append(
                        (
                            f"{name}.{sub}",
                            "(yaml only)",
                            typename(sf.annotation).split("[")[0],
                            "{}" if "dict" in str(sf.annotation) else "[]",
                            sf.description or "",
                        )
                    )
                    continue
                rows.append(
                    (
                        f"{name}.{sub}",
                        f"{ENV_PREFIX}{name}_{sub}".upper(),
                        typename(sf.annotation),
                        _default(sf),
                        sf.description or "",
                    )
                )
        elif name in _YAML_ONLY:
            rows.append(
                (
                    name,
                    "(yaml only)",
                    "mapping" if name in ("providers", "models") else "list",
                    "{}" if name in ("providers", "models") else "[]",
                    field.description or "",
                )
            )
        else:
            rows.append(
                (
                    name,
                    f"{ENV_PREFIX}{name}".upper(),
                    typename(ann),
                    repr(field.default),
                    field.description or "",
                )
            )
    for sub, sf in ProviderSettings.model_fields.items():
        rows.append(
            (
                f"providers.NAME.{sub}",
                "(yaml only)",
                typename(sf.annotation),
                _default(sf),
                sf.description or "",
            )
        )
    for sub, sf in DeploymentSettings.model_fields.items():
        rows.append(
            (
                f"models.ALIAS.deployments[].{sub}",
                "(yaml only)",
                typename(sf.annotation),
                _default(sf),
                sf.description or "",
            )
        )
    for sub, sf in ModelAliasSettings.model_fields.items():
        if sub in ("deployments", "circuit_breaker"):
            continue
        rows.append(
            (
                f"models.ALIAS.{sub}",
                "(yaml only)",
                typename(sf.annotation),
                _default(sf),
                sf.description or "",
            )
        )
    for prefix, model in (
        ("models.ALIAS.circuit_breaker", CircuitBreakerSettings),
        ("budgets[]", BudgetSettings),
        ("prices[]", PriceSettings),
        ("prices[].tiers[]", PriceTier),
    ):
        for sub, sf in model.model_fields.items():
            if sub == "tiers":
                continue
            rows.append(
                (
                    f"{prefix}.{sub}",
                    "(yaml only)",
                    typename(sf.annotation),
                    _default(sf),
                    sf.description or "",
                )
            )
    for prefix, model in (
        ("alerts.channels.NAME", ChannelSettings),
        ("alerts.rules[]", RuleSettings),
        ("alerts.rules[].condition", ConditionSettings),
    ):
        for sub, sf in model.model_fields.items():
            if sub == "condition":
                continue
            rows.append(
                (
                    f"{prefix}.{sf.alias or sub}",
                    "(yaml only)",
                    typename(sf.annotation),
                    _default(sf),
                    sf.description or "",
                )
            )
    for sub, sf in ComponentSettings.model_fields.items():
        rows.append(
            (
                f"components[].{sub}",
                "(yaml only)",
                typename(sf.annotation),
                _default(sf),
                sf.description or "",
            )
        )
    return rows
