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
    BeforeValidator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from keel.config.alerts import (
    AlertsSettings,
    ChannelKind,
    ChannelSettings,
    ConditionSettings,
    Duration,
    RuleSettings,
    parse_duration,
)
from keel.config.costs import BudgetSettings, PriceSettings, PriceTier
from keel.config.deploy import DeployModelSettings, DeploySettings
from keel.config.pipelines import PipelinesSettings
from keel.config.quality import (
    DriftMonitorSettings,
    DriftReferenceSettings,
    DriftSettings,
    EvalsSettings,
    OnlineEvaluatorSettings,
)
from keel.config.registry import RegistrySettings
from keel.config.sections import (
    ENV_PREFIX,
    AuthSettings,
    CircuitBreakerSettings,
    ComponentKind,
    ComponentSettings,
    DataSettings,
    DeploymentSettings,
    GatewaySettings,
    LimitsSettings,
    LocalSettings,
    ModelAliasSettings,
    MonitoringSettings,
    PromptSettings,
    ProviderKind,
    ProviderSettings,
    RecorderSettings,
    RedactionSettings,
    RetentionSettings,
    _Section,
    _shorthand_deployment,
)
from keel.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "AlertsSettings",
    "AuthSettings",
    "BudgetSettings",
    "ChannelKind",
    "ChannelSettings",
    "CircuitBreakerSettings",
    "ComponentKind",
    "ComponentSettings",
    "ConditionSettings",
    "DataSettings",
    "DeployModelSettings",
    "DeploySettings",
    "DeploymentSettings",
    "DriftMonitorSettings",
    "DriftReferenceSettings",
    "DriftSettings",
    "Duration",
    "EvalsSettings",
    "GatewaySettings",
    "LimitsSettings",
    "LocalSettings",
    "ModelAliasSettings",
    "MonitoringSettings",
    "OnlineEvaluatorSettings",
    "PriceSettings",
    "PriceTier",
    "PromptSettings",
    "ProviderKind",
    "ProviderSettings",
    "RecorderSettings",
    "RedactionSettings",
    "RegistrySettings",
    "RetentionSettings",
    "RuleSettings",
    "Settings",
    "format_validation_error",
    "load_settings",
    "parse_duration",
    "read_yaml",
    "reference_rows",
]


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
    evals: EvalsSettings = Field(default_factory=EvalsSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    deploy: DeploySettings = Field(default_factory=DeploySettings)
    pipelines: PipelinesSettings = Field(default_factory=PipelinesSettings)
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
