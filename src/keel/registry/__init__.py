"""The model registry: models, numbered versions (an artifact or a deployment config),
aliases/stages, approvals, and the audit trail of every change."""

from keel.registry.model import DeploymentSpec
from keel.registry.service import RegistryService

__all__ = ["DeploymentSpec", "RegistryService"]
