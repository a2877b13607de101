"""Tracked runs and the model registry."""

from __future__ import annotations

from pydantic import Field

from keel.config.sections import _Section


class RegistrySettings(_Section):
    max_artifact_mb: int = Field(
        5120,
        ge=1,
        description="Largest run artifact file accepted through the API (MiB); larger → 413.",
    )
    max_card_kb: int = Field(
        512, ge=1, description="Largest model card (Markdown) a version may carry (KiB)."
    )
