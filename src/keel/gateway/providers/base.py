"""The provider contract, and the registry of provider kinds.

A provider speaks to one upstream. The gateway hands it an OpenAI-shaped
request body whose ``model`` is already the upstream's model name, and gets
OpenAI-shaped answers back, whatever the upstream speaks:

- :meth:`Provider.chat` → a ``chat.completion`` dict;
- :meth:`Provider.chat_stream` → an async iterator of ``(raw_json, chunk)``
  pairs, ``chunk`` a ``chat.completion.chunk`` dict and ``raw_json`` its JSON
  bytes (an OpenAI-compatible upstream's bytes are relayed untouched);
- :meth:`Provider.embeddings` → a ``list`` embeddings response dict.

Errors are raised as :class:`keel.errors.UpstreamError` (or its subclasses)
carrying the upstream's message and the status to answer with.

A new provider kind is one file: subclass :class:`Provider`, set ``kind``, and
decorate the class with :func:`register`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import aiohttp

from keel.config import ProviderSettings
from keel.errors import Unsupported

ChatChunk = tuple[bytes, dict[str, Any]]

PROVIDER_KINDS: dict[str, type[Provider]] = {}


def register(cls: type[Provider]) -> type[Provider]:
    PROVIDER_KINDS[cls.kind] = cls
    return cls


class Provider:
    kind: ClassVar[str] = ""
    supports_chat: ClassVar[bool] = True
    supports_embeddings: ClassVar[bool] = False
    #: True when the upstream reports token usage on streams when asked.
    reports_stream_usage: ClassVar[bool] = True

    def __init__(
        self,
        name: str,
        settings: ProviderSettings,
        *,
        session: aiohttp.ClientSession | None = None,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        api_key: str | None = None,
        client: Any = None,  # accepted for adapters that take no network seam
    ) -> None:
        self.name = name
        self.settings = settings
        self.api_key = api_key
        self._session = session
        self._session_factory = session_factory
        self._owns_session = session is None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP session (the network seam), created on first use inside the loop."""
        if self._session is None:
            if self._session_factory is None:
                raise RuntimeError(f"provider '{self.name}' has no HTTP session")
            self._session = self._session_factory()
        return self._session

    async def close_session(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
            self._session = None

    @property
    def available(self) -> bool:
        """False when the provider cannot serve at all (e.g. a missing runtime)."""
        return True

    async def start(self) -> None:
        """Called once when the app starts (load models, warm pools)."""

    async def aclose(self) -> None:
        """Called once when the app stops."""

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        raise Unsupported(f"provider '{self.name}' does not serve chat completions")

    def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[ChatChunk]:
        raise Unsupported(f"provider '{self.name}' does not serve chat completions")

    async def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        raise Unsupported(f"provider '{self.name}' does not serve embeddings")
