"""The errors of :mod:`keel.gateway.limits` (re-exported there): 429 for a rate limit
or a spent budget, 503 when limits cannot be checked."""

from __future__ import annotations

from keel.errors import KeelError


class RateLimited(KeelError):
    """Too many requests or tokens this minute; ``retry_after_s`` until the window resets."""

    status = 429
    type = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(
            message, code="rate_limit_exceeded", extra={"retry_after_s": retry_after_s}
        )
        self.retry_after_s = retry_after_s


class BudgetExceeded(KeelError):
    """A hard budget is spent (OpenAI's ``insufficient_quota``)."""

    status = 429
    type = "insufficient_quota"

    def __init__(
        self,
        message: str,
        *,
        budget: str,
        spent_usd: float,
        limit_usd: float,
        resets_at: str,
        retry_after_s: int,
    ) -> None:
        super().__init__(
            message,
            code="insufficient_quota",
            extra={
                "budget": budget,
                "spent_usd": spent_usd,
                "limit_usd": limit_usd,
                "resets_at": resets_at,
            },
        )
        self.budget = budget
        self.spent_usd = spent_usd
        self.limit_usd = limit_usd
        self.resets_at = resets_at
        self.retry_after_s = retry_after_s


class LimitsUnavailable(KeelError):
    """Redis is unreachable and ``limits.redis_failure`` is ``closed``."""

    status = 503
    type = "limits_unavailable"
