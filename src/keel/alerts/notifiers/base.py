"""The notifier contract, the registry of channel kinds, and the shared HTTP session.

A notifier delivers one group of notifications (everything one evaluation tick
has for its channel) as ONE message, or raises :class:`DeliveryError`:
``retryable=True`` for network errors, timeouts, 5xx and 429; ``False`` for
other 4xx and configuration problems (a missing environment variable, a refused
login). The :class:`~keel.alerts.delivery.Dispatcher` does the retrying, the
timeouts and the recording; a notifier only sends.

A new channel kind is one file: subclass :class:`Notifier`, set ``kind``,
decorate with :func:`register_notifier`, import it in ``notifiers/__init__``.
Error messages never contain a secret: values read through :meth:`Notifier.env`
are scrubbed from every error text (:meth:`Notifier.scrub`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import ClassVar
from urllib.parse import urlsplit

import aiohttp

from keel.alerts.model import DeliveryError, Notification
from keel.config import ChannelSettings
from keel.errors import ConfigError
from keel.gateway.providers._http import make_session

NOTIFIERS: dict[str, type[Notifier]] = {}

#: Slack, PagerDuty and most webhooks answer 429 with Retry-After; honour it up to this.
MAX_RETRY_AFTER_S = 60.0
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def register_notifier(cls: type[Notifier]) -> type[Notifier]:
    NOTIFIERS[cls.kind] = cls
    return cls


class HTTPDeliveryError(DeliveryError):
    """An HTTP answer that was not a success; carries the receiver's Retry-After."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None,
        retryable: bool,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, retryable=retryable)
        self.status = status
        self.retry_after_s = retry_after_s


class SharedSession:
    """One aiohttp session for all notifiers, created on first use inside the event loop.

    Pass the instance itself as ``session_factory``; close it with :meth:`aclose`.
    """

    def __init__(self, factory: Callable[[], aiohttp.ClientSession] | None = None) -> None:
        self._factory = factory or _default_session
        self._session: aiohttp.ClientSession | None = None

    def __call__(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = self._factory()
        return self._session

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


def _default_session() -> aiohttp.ClientSession:
    # Per-request timeouts (the channel's timeout_s) override these.
    return make_session(read_timeout_s=30.0, connect_timeout_s=10.0, max_connections=32)


def host_of(url: str) -> str:
    """The host (and port) of a URL, never its path or credentials (Slack URLs are secret)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        return f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        return "an invalid URL"


class Notifier:
    """Sends groups of notifications to one configured channel."""

    kind: ClassVar[str] = ""

    def __init__(
        self,
        name: str,
        settings: ChannelSettings,
        environ: Mapping[str, str],
        session_factory: Callable[[], aiohttp.ClientSession],
    ) -> None:
        self.name = name
        self.settings = settings
        self._environ = environ
        self._session_factory = session_factory
        self._secrets: set[str] = set()

    async def send(self, notifications: list[Notification]) -> None:
        """Deliver ``notifications`` as one message (or raise :class:`DeliveryError`)."""
        raise NotImplementedError

    # --- helpers for subclasses -------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        return self._session_factory()

    @property
    def timeout_s(self) -> float:
        return self.settings.timeout_s

    def env_vars(self) -> list[tuple[str, str]]:
        """(variable, what it holds) for every environment variable this channel reads."""
        s = self.settings
        named = (
            (s.url_env, "URL"),
            (s.secret_env, "signing secret"),
            (s.routing_key_env, "routing key"),
            (s.password_env, "SMTP password"),
        )
        out = [(var, what) for var, what in named if var]
        for value in s.headers.values():
            out.extend((var, "header value") for var in _ENV_REF.findall(value))
        return out

    def check(self) -> list[str]:
        """Configuration problems found without sending (missing environment variables)."""
        return [
            f"channel '{self.name}': environment variable {var} ({what}) is not set"
            for var, what in self.env_vars()
            if not self._environ.get(var)
        ]

    def env(self, var: str, what: str) -> str:
        """The value of ``var``; a non-retryable DeliveryError naming it when unset."""
        value = self._environ.get(var)
        if not value:
            raise DeliveryError(
                f"environment variable {var} ({what} of channel '{self.name}') is not set",
                retryable=False,
            )
        self._secrets.add(value)
        return value

    def url(self) -> str:
        s = self.settings
        if s.url:
            return s.url
        if s.url_env:
            url = self.env(s.url_env, "URL")
            if not url.startswith(("http://", "https://")):
                raise DeliveryError(
                    f"environment variable {s.url_env} (URL of channel '{self.name}') "
                    "does not hold an http:// or https:// URL",
                    retryable=False,
                )
            return url
        raise DeliveryError(f"channel '{self.name}' has no url or url_env", retryable=False)

    def expand(self, value: str) -> str:
        """``${VAR}`` in a header value → the variable's value (secrets stay out of keel.yaml)."""
        return _ENV_REF.sub(lambda m: self.env(m.group(1), "header value"), value)

    def scrub(self, text: str) -> str:
        """``text`` with every secret this notifier has read replaced by ``***``."""
        for secret in sorted(self._secrets, key=len, reverse=True):
            if len(secret) >= 4:
                text = text.replace(secret, "***")
        return text

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> bytes:
        """POST ``body``; the answer's bytes on 2xx, else a classified DeliveryError."""
        where = host_of(url)
        try:
            async with self.session.post(
                url,
                data=body,
                headers=dict(headers),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as resp:
                content = await resp.read()
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except TimeoutError as e:
            raise DeliveryError(f"{where} did not answer within {self.timeout_s:g} s") from e
        except (aiohttp.ClientError, OSError) as e:
            raise DeliveryError(
                self.scrub(f"could not deliver to {where}: {type(e).__name__}: {e}")
            ) from e
        if 200 <= status < 300:
            return content
        snippet = content[:300].decode("utf-8", "replace").strip()
        retryable = status in (408, 425, 429) or status >= 500
        raise HTTPDeliveryError(
            self.scrub(f"{where} answered HTTP {status}" + (f": {snippet}" if snippet else "")),
            status=status,
            retryable=retryable,
            retry_after_s=retry_after,
        )


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, min(float(value), MAX_RETRY_AFTER_S))
    except ValueError:
        return None  # an HTTP date: the exponential backoff is good enough


def build_notifiers(
    channels: Mapping[str, ChannelSettings],
    environ: Mapping[str, str],
    session_factory: Callable[[], aiohttp.ClientSession],
) -> dict[str, Notifier]:
    """One notifier per configured channel. Missing secrets surface at send time."""
    out: dict[str, Notifier] = {}
    for name, settings in channels.items():
        cls = NOTIFIERS.get(settings.kind)
        if cls is None:
            raise ConfigError(
                f"alerts.channels.{name}.kind: unknown channel kind '{settings.kind}' "
                f"(known: {', '.join(sorted(NOTIFIERS))})"
            )
        out[name] = cls(name, settings, environ, session_factory)
    return out
