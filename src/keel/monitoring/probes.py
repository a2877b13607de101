"""Health probes of the components an application depends on, and the daemon that runs them.

A probe kind is one small class: subclass :class:`ComponentProbe`, set ``kind``,
implement ``probe()`` (return when the component is up, raise
:class:`ProbeDown` or anything else when it is not) and decorate it with
:func:`register_probe`. :meth:`Probe.check` bounds every probe by its timeout
and turns every outcome into a :class:`ProbeResult`; it never raises.

Every provider of the gateway is probed too, as a component named
``provider:<name>`` (see :func:`provider_probe`).

Secrets come only from environment variable *names* (``api_key_env``), resolved
in the ``environ`` mapping the daemon is given; error texts never carry them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from prometheus_client import CollectorRegistry, Gauge
from sqlalchemy import insert
from sqlalchemy.engine import Engine

from keel.config import ComponentSettings, MonitoringSettings
from keel.daemon import Daemon, now_ms
from keel.gateway.providers._http import upstream_error_message
from keel.gateway.providers.base import Provider
from keel.store.tables import component_checks

log = logging.getLogger("keel.probes")

ANTHROPIC_DEFAULT_URL = "https://api.anthropic.com"
# Enough of a body to quote an error message; a health page may be large.
_MAX_BODY = 64 * 1024
_MAX_ERROR = 300


@dataclass(frozen=True)
class ProbeResult:
    up: bool
    latency_ms: float
    error: str | None = None


class ProbeDown(Exception):
    """Raised by a probe: the component answered, but not as a healthy one. The message is
    the error shown to the user."""


class ProbeContext:
    """What every probe of one daemon shares: defaults, the environment, one HTTP session."""

    def __init__(
        self,
        environ: Mapping[str, str],
        *,
        timeout_s: float = 5.0,
        interval_s: float = 30.0,
    ) -> None:
        self.environ = environ
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """Created on first use, inside the running loop."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # Probes are bounded by asyncio.wait_for; a fresh connection per
                # probe (force_close) checks that the component still accepts
                # connections, not that an old pooled one is still open.
                timeout=aiohttp.ClientTimeout(total=None),
                connector=aiohttp.TCPConnector(force_close=True, limit=64),
            )
        return self._session

    async def get(
        self, url: str, headers: Mapping[str, str] | None = None, *, follow: bool = True
    ) -> tuple[int, bytes]:
        async with self.session.get(url, headers=headers, allow_redirects=follow) as resp:
            return resp.status, await resp.content.read(_MAX_BODY)

    async def post_json(
        self, url: str, body: Any, headers: Mapping[str, str] | None = None
    ) -> tuple[int, bytes]:
        async with self.session.post(url, json=body, headers=headers) as resp:
            return resp.status, await resp.content.read(_MAX_BODY)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 1] + "…"


def _http_error(status: int, body: bytes) -> str:
    msg = upstream_error_message(status, body)
    if status in (401, 403):
        return f"authentication failed (HTTP {status}): {msg}"
    return f"HTTP {status}: {msg}"


class Probe:
    """One check of one component. Subclasses implement :meth:`probe`."""

    kind: str = ""

    def __init__(
        self,
        name: str,
        ctx: ProbeContext,
        *,
        timeout_s: float | None = None,
        interval_s: float | None = None,
    ) -> None:
        self.name = name
        self.ctx = ctx
        self.timeout_s = timeout_s or ctx.timeout_s
        self.interval_s = interval_s or ctx.interval_s

    async def probe(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def secrets(self) -> list[str]:
        """Values that must never appear in an error text."""
        return []

    async def check(self) -> ProbeResult:
        """Run the probe within its timeout. Never raises (except cancellation)."""
        t0 = time.perf_counter()
        error: str | None = None
        try:
            await asyncio.wait_for(self.probe(), self.timeout_s)
        except TimeoutError:
            error = f"timed out after {self.timeout_s:g}s"
        except ProbeDown as e:
            error = _one_line(str(e)) or "down"
        except asyncio.CancelledError:
            raise
        except Exception as e:
            text = str(e)
            error = _one_line(f"{type(e).__name__}: {text}" if text else type(e).__name__)
        latency_ms = (time.perf_counter() - t0) * 1000
        if error is not None:
            for secret in self.secrets():
                if secret:
                    error = error.replace(secret, "***")
        return ProbeResult(up=error is None, latency_ms=latency_ms, error=error)


# -- configured components ------------------------------------------------------------


class ComponentProbe(Probe):
    """A probe of a component listed under ``components:`` in keel.yaml."""

    def __init__(self, component: ComponentSettings, ctx: ProbeContext) -> None:
        super().__init__(
            component.name, ctx, timeout_s=component.timeout_s, interval_s=component.interval_s
        )
        self.component = component

    @property
    def url(self) -> str:
        return (self.component.url or "").rstrip("/")

    @property
    def api_key(self) -> str | None:
        """The value of ``api_key_env``; a missing variable is an error, not an empty key."""
        env = self.component.api_key_env
        if not env:
            return None
        key = self.ctx.environ.get(env)
        if not key:
            raise ProbeDown(f"environment variable {env} (api_key_env) is not set")
        return key

    def secrets(self) -> list[str]:
        out: list[str] = []
        env = self.component.api_key_env
        if env and self.ctx.environ.get(env):
            out.append(self.ctx.environ[env])
        with contextlib.suppress(ValueError):
            if pw := urlsplit(self.component.url or "").password:
                out.append(pw)
        return out


PROBES: dict[str, type[ComponentProbe]] = {}


def register_probe(cls: type[ComponentProbe]) -> type[ComponentProbe]:
    PROBES[cls.kind] = cls
    return cls


@register_probe
class HttpProbe(ComponentProbe):
    """GET ``url``; up when the status is ``expected_status``."""

    kind = "http"

    async def probe(self) -> None:
        expected = self.component.expected_status
        # Expecting a redirect means checking the redirect itself, not its target.
        status, body = await self.ctx.get(
            self.component.url or "", follow=not 300 <= expected < 400
        )
        if status != expected:
            raise ProbeDown(
                f"HTTP {status} (expected {expected}): {upstream_error_message(status, body)}"
            )


@register_probe
class TcpProbe(ComponentProbe):
    """Open a TCP connection to ``host:port``."""

    kind = "tcp"

    async def probe(self) -> None:
        _, writer = await asyncio.open_connection(self.component.host, self.component.port)
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@register_probe
class OpenAIProbe(ComponentProbe):
    """``GET {url}/models``; with ``model``, a one-token chat completion instead."""

    kind = "openai"

    async def probe(self) -> None:
        key = self.api_key
        headers = {"authorization": f"Bearer {key}"} if key else {}
        if self.component.model:
            body = {
                "model": self.component.model,
                "messages": [{"role": "user", "content": "ping"}],
                "max_tokens": 1,
            }
            status, content = await self.ctx.post_json(
                f"{self.url}/chat/completions", body, headers
            )
        else:
            status, content = await self.ctx.get(f"{self.url}/models", headers)
        if not 200 <= status < 300:
            raise ProbeDown(_http_error(status, content))


# -- gateway providers ----------------------------------------------------------------


class ProviderProbe(Probe):
    """A provider of the gateway, probed as the component ``provider:<name>``."""

    def __init__(self, provider: Provider, ctx: ProbeContext) -> None:
        super().__init__(f"provider:{provider.name}", ctx)
        self.provider = provider
        self.kind = provider.kind

    def secrets(self) -> list[str]:
        return [self.provider.api_key] if self.provider.api_key else []

    async def _get(self, url: str, headers: dict[str, str]) -> None:
        status, body = await self.ctx.get(url, {**self.provider.settings.headers, **headers})
        if 200 <= status < 300:
            return
        # The server answered and took the key: listing models is optional among
        # OpenAI-compatible servers, so a missing route does not make it down.
        if status in (404, 405):
            return
        raise ProbeDown(_http_error(status, body))


class OpenAIProviderProbe(ProviderProbe):
    async def probe(self) -> None:
        key = self.provider.api_key
        headers = {"authorization": f"Bearer {key}"} if key else {}
        await self._get(f"{(self.provider.settings.base_url or '').rstrip('/')}/models", headers)


class AnthropicProviderProbe(ProviderProbe):
    async def probe(self) -> None:
        base = (self.provider.settings.base_url or ANTHROPIC_DEFAULT_URL).rstrip("/")
        headers = {"anthropic-version": self.provider.settings.anthropic_version}
        if self.provider.api_key:
            headers["x-api-key"] = self.provider.api_key
        await self._get(f"{base}/v1/models", headers)


class AvailableProviderProbe(ProviderProbe):
    """In-process providers (the embedded model): up when they can serve."""

    async def probe(self) -> None:
        if not self.provider.available:
            reason = getattr(self.provider, "unavailable_reason", None)
            raise ProbeDown(reason or f"provider '{self.provider.name}' is not available (yet)")


PROVIDER_PROBES: dict[str, type[ProviderProbe]] = {
    "openai": OpenAIProviderProbe,
    "anthropic": AnthropicProviderProbe,
    "local": AvailableProviderProbe,
}


def provider_probe(provider: Provider, ctx: ProbeContext) -> ProviderProbe:
    return PROVIDER_PROBES.get(provider.kind, AvailableProviderProbe)(provider, ctx)


def build_probes(
    components: Iterable[ComponentSettings],
    providers: Mapping[str, Provider],
    ctx: ProbeContext,
) -> list[Probe]:
    """One probe per component, then one per provider (unless a component has its name)."""
    probes: list[Probe] = [PROBES[c.kind](c, ctx) for c in components]
    names = {p.name for p in probes}
    for provider in providers.values():
        p = provider_probe(provider, ctx)
        if p.name not in names:
            probes.append(p)
    return probes


# -- the daemon -----------------------------------------------------------------------


class ProbeDaemon(Daemon):
    """Runs the due probes concurrently each tick, stores every result in
    ``component_checks`` and exports ``keel_component_up`` and
    ``keel_component_probe_seconds``. One replica runs it (store lease)."""

    name = "probes"
    singleton = True

    def __init__(
        self,
        engine: Engine,
        components: list[ComponentSettings],
        providers: Mapping[str, Provider],
        monitoring: MonitoringSettings,
        environ: Mapping[str, str],
        registry: CollectorRegistry,
    ) -> None:
        self.ctx = ProbeContext(
            environ, timeout_s=monitoring.probe_timeout_s, interval_s=monitoring.probe_interval_s
        )
        self.probes = build_probes(
            components, providers if monitoring.probe_providers else {}, self.ctx
        )
        # Set before the base builds the lease: its TTL follows the interval.
        self.interval_s = min([monitoring.probe_interval_s, *(p.interval_s for p in self.probes)])
        super().__init__(engine)
        self.latest: dict[str, tuple[int, ProbeResult]] = {}
        self._due: dict[str, float] = {}
        self.up = Gauge(
            "keel_component_up",
            "1 when the last probe of the component succeeded.",
            ["component", "kind"],
            registry=registry,
        )
        self.probe_seconds = Gauge(
            "keel_component_probe_seconds",
            "Duration of the last probe of the component.",
            ["component", "kind"],
            registry=registry,
        )

    def components(self) -> list[tuple[str, str]]:
        """(name, kind) of every probed component, configured ones first."""
        return [(p.name, p.kind) for p in self.probes]

    async def tick(self) -> None:
        now = time.monotonic()
        due = [p for p in self.probes if now >= self._due.get(p.name, 0.0)]
        if not due:
            return
        ts = now_ms()
        results = await asyncio.gather(*(p.check() for p in due))
        rows = []
        for p, r in zip(due, results, strict=True):
            self._due[p.name] = now + p.interval_s
            self.latest[p.name] = (ts, r)
            self.up.labels(p.name, p.kind).set(1.0 if r.up else 0.0)
            self.probe_seconds.labels(p.name, p.kind).set(r.latency_ms / 1000)
            rows.append(
                {
                    "ts_ms": ts,
                    "component": p.name,
                    "kind": p.kind,
                    "up": r.up,
                    "latency_ms": round(r.latency_ms, 3),
                    "error": r.error,
                }
            )
            if not r.up:
                log.info("component %s is down: %s", p.name, r.error)
        await asyncio.to_thread(self._store, rows)

    def _store(self, rows: list[dict[str, Any]]) -> None:
        assert self.engine is not None
        with self.engine.begin() as conn:
            conn.execute(insert(component_checks), rows)

    async def aclose(self) -> None:
        """Close the probes' HTTP session (idempotent)."""
        await self.ctx.aclose()

    async def stop(self) -> None:
        await super().stop()
        await self.aclose()


# The vector-database probes (qdrant, chroma, pgvector, redis) live in probes_vector:
# importing it registers them. Their names stay reachable from this module.
from keel.monitoring import probes_vector as _probes_vector  # noqa: E402

_VECTOR_NAMES = frozenset(
    {"ChromaProbe", "PgvectorProbe", "QdrantProbe", "RedisProbe", "_libpq_url"}
)


def __getattr__(name: str) -> Any:
    if name in _VECTOR_NAMES:
        return getattr(_probes_vector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
