"""One error hierarchy for Keel, translated at the edges.

The API turns a :class:`KeelError` into a JSON error body in the OpenAI shape
(``{"error": {"message", "type", "code", "param"}}``) with ``status``; the CLI
prints ``str(error)`` on one line and exits non-zero.
"""

from __future__ import annotations

from typing import Any


class KeelError(Exception):
    """Base class. ``status`` is the HTTP status the API answers with."""

    status: int = 500
    type: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        status: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        if status is not None:
            self.status = status
        self.extra = extra or {}

    def to_body(self) -> dict[str, Any]:
        err: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "code": self.code,
            "param": self.param,
        }
        err.update(self.extra)
        return {"error": err}


class ConfigError(KeelError):
    """The configuration is invalid; the message names the entry and field."""

    status = 500
    type = "config_error"


class InvalidRequest(KeelError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status = 413


class NotFound(KeelError):
    status = 404
    type = "not_found_error"


class ModelNotFound(NotFound):
    """Unknown model alias; the message lists the available names."""

    def __init__(self, model: str, available: list[str]) -> None:
        names = ", ".join(sorted(available)) or "(none configured)"
        super().__init__(
            f"The model '{model}' does not exist. Available models: {names}",
            code="model_not_found",
            param="model",
        )
        self.available = sorted(available)


class Unsupported(InvalidRequest):
    """The model exists but its provider cannot do this (e.g. embeddings)."""

    code = "unsupported"


class UpstreamError(KeelError):
    """The upstream model answered with an error, or could not be reached.

    ``status`` follows the upstream: its own 4xx is passed through (the caller
    sent something the model rejected), 5xx and malformed answers become 502,
    connection failures 502, timeouts 504.
    """

    status = 502
    type = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        upstream_status: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code)
        self.upstream_status = upstream_status


class UpstreamTimeout(UpstreamError):
    type = "upstream_timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, status=504, code="timeout")


class StoreUnavailable(KeelError):
    status = 503
    type = "store_unavailable"


class Conflict(KeelError):
    """The request contradicts the current state (a duplicate, a read-only object)."""

    status = 409
    type = "conflict_error"
