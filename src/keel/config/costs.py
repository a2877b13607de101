"""Cost settings: budgets and prices."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from keel.config.sections import _Section


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
