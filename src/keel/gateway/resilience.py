"""Retries, fallbacks, per-deployment timeouts and circuit breakers.

A call to an alias tries its deployments in the order its strategy gives
(:meth:`keel.gateway.router.Alias.candidates`), moving to the next one on a
retryable failure — a connection error, a timeout, 429 or a 5xx — after a short
exponential backoff, up to ``retries`` extra tries. A deployment that fails
``circuit_breaker.failures`` times in a row is skipped for ``cooldown_s``
(its circuit is open); after the cool-down one call probes it (half-open), and
a success closes the circuit again. Client errors (other 4xx) are never retried:
the same request would fail the same way.

Breaker state is per process: each replica learns on its own which upstream
is failing, which is what a breaker needs (it reacts within a few calls).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from keel.errors import KeelError, UpstreamError, UpstreamTimeout

if TYPE_CHECKING:
    from keel.gateway.router import Alias, Deployment

T = TypeVar("T")

RETRYABLE_UPSTREAM_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504, 529})
RETRYABLE_CODES = frozenset({"upstream_unreachable", "upstream_connection_lost", "timeout"})


def is_retryable(e: KeelError) -> bool:
    if isinstance(e, UpstreamTimeout):
        return True
    if not isinstance(e, UpstreamError):
        return False
    if e.code in RETRYABLE_CODES:
        return True
    if e.upstream_status is not None:
        return e.upstream_status in RETRYABLE_UPSTREAM_STATUS
    return e.status >= 500 and e.code != "upstream_malformed"


@dataclass
class Breaker:
    threshold: int = 5
    cooldown_s: float = 30.0
    failures: int = 0
    open_until: float = 0.0  # monotonic seconds; 0 = closed

    def is_open(self, now: float | None = None) -> bool:
        return self.open_until > (now if now is not None else time.monotonic())

    def success(self) -> None:
        self.failures = 0
        self.open_until = 0.0

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = time.monotonic() + self.cooldown_s

    @property
    def state(self) -> str:
        if self.is_open():
            return "open"
        return "half-open" if self.failures >= self.threshold else "closed"


@dataclass
class Outcome:
    deployment: Deployment
    attempts: int
    tried: list[str]  # "provider/model" of each try, in order


async def with_failover(
    alias: Alias,
    call: Callable[[Deployment], Awaitable[T]],
    *,
    on_attempt: Callable[[Deployment], None] | None = None,
) -> tuple[T, Outcome]:
    """Run ``call`` on the alias' deployments until one succeeds or tries run out.

    Raises the last error (annotated with what was tried) when every try failed.
    """
    order = alias.candidates()
    tries = alias.retries + 1
    backoff = alias.retry_backoff_s
    tried: list[str] = []
    last: KeelError | None = None
    for attempt in range(tries):
        dep = order[attempt % len(order)]
        tried.append(f"{dep.provider.name}/{dep.model}")
        if on_attempt is not None:
            on_attempt(dep)
        dep.inflight += 1
        try:
            if dep.timeout_s:
                try:
                    result = await asyncio.wait_for(call(dep), dep.timeout_s)
                except TimeoutError:
                    raise UpstreamTimeout(
                        f"upstream '{dep.provider.name}' timed out after {dep.timeout_s:g}s "
                        "(deployment timeout_s)"
                    ) from None
            else:
                result = await call(dep)
        except KeelError as e:
            last = e
            if not is_retryable(e):
                raise
            dep.breaker.failure()
            if attempt + 1 < tries:
                await asyncio.sleep(backoff * (2**attempt))
            continue
        finally:
            dep.inflight -= 1
        dep.breaker.success()
        return result, Outcome(dep, attempt + 1, tried)
    assert last is not None
    if len(tried) > 1:
        last.message = f"{last.message} (tried {len(tried)} times: {', '.join(tried)})"
        last.args = (last.message,)
    raise last
