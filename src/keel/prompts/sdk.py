"""Prompts for applications: ``keel.prompts.get("greet").render(name="Ada")``.

Each fetched prompt is also written to a local cache directory (one JSON file
per reference), so an application keeps rendering the last prompt it saw when
Keel is unreachable or answers 5xx (a warning is logged). A 404 is an answer,
not an outage: it is raised, never masked by the cache.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import orjson

from keel.errors import InvalidRequest, KeelError, NotFound, StoreUnavailable
from keel.prompts.model import PromptSpec, render

log = logging.getLogger("keel.prompts")

DEFAULT_URL = "http://127.0.0.1:4000"


class Prompt:
    """One version of a prompt, as fetched from Keel (or its local cache)."""

    def __init__(self, data: dict[str, Any], *, from_cache: bool = False) -> None:
        self.id: str = data["id"]
        self.name: str = data["name"]
        self.version: int = data["version"]
        self.content_hash: str | None = data.get("content_hash")
        self.spec = PromptSpec.model_validate(data["spec"])
        self.from_cache = from_cache
        self._data = data

    @property
    def model(self) -> str | None:
        return self.spec.model

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.spec.params)

    @property
    def variables(self) -> dict[str, Any]:
        return {k: v.model_dump() for k, v in self.spec.variables.items()}

    def render(self, **variables: Any) -> list[dict[str, Any]]:
        """The chat messages, rendered; :class:`keel.prompts.model.RenderError`
        (a ValueError) names the variable that is missing, extra or mistyped."""
        return render(self.spec, variables)[0]

    def to_dict(self) -> dict[str, Any]:
        return dict(self._data)

    def __repr__(self) -> str:
        src = ", from cache" if self.from_cache else ""
        return f"<Prompt {self.name}@v{self.version}{src}>"


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    env = os.environ.get("KEEL_PROMPTS_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "keel" / "prompts"


def _cache_file(directory: Path, endpoint: str, ref: str) -> Path:
    # One file per Keel and reference; names made safe for any filesystem.
    host = re.sub(r"[^A-Za-z0-9.-]+", "_", endpoint.split("://", 1)[-1]).strip("_")
    return directory / f"{host}__{re.sub(r'[^A-Za-z0-9._@-]+', '_', ref)}.json"


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(data))
        os.replace(tmp, path)  # readers never see half a file
    except OSError as e:  # a read-only cache must not break the application
        log.warning("could not write the prompt cache %s: %s", path, e)


def get(
    name: str,
    label: str | None = "production",
    version: int | None = None,
    *,
    endpoint: str | None = None,
    api_key: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    timeout: float = 2.0,
) -> Prompt:
    """Fetch a prompt from Keel: by ``label`` (default ``production``) or ``version``.

    ``name`` may also be a full reference (``greet@staging``, ``greet@3``).
    ``endpoint`` defaults to ``$KEEL_URL`` (else http://127.0.0.1:4000), ``api_key``
    to ``$KEEL_API_KEY``. When Keel is unreachable or fails (5xx), the copy cached
    by the last successful fetch is returned and a warning logged.
    """
    import httpx  # late: `import keel.prompts` stays light

    if "@" in name:
        ref = name
    elif version is not None:
        ref = f"{name}@v{int(version)}"
    elif label:
        ref = f"{name}@{label}"
    else:
        ref = name
    endpoint = (endpoint or os.environ.get("KEEL_URL") or DEFAULT_URL).rstrip("/")
    api_key = api_key if api_key is not None else os.environ.get("KEEL_API_KEY")
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    path = _cache_file(_cache_dir(cache_dir), endpoint, ref)
    try:
        r = httpx.get(
            f"{endpoint}/api/prompts/resolve", params={"ref": ref}, headers=headers, timeout=timeout
        )
    except httpx.HTTPError as e:
        return _from_cache(path, ref, f"Keel at {endpoint} is unreachable ({e})")
    if r.status_code >= 500:
        return _from_cache(path, ref, f"Keel at {endpoint} answered {r.status_code}")
    if r.status_code != 200:
        try:
            msg = r.json()["error"]["message"]
        except Exception:
            msg = r.text[:200]
        if r.status_code == 404:
            raise NotFound(msg, param="prompt")
        if r.status_code == 400:
            raise InvalidRequest(msg)
        raise KeelError(f"Keel answered {r.status_code}: {msg}", status=r.status_code)
    data = r.json()
    prompt = Prompt(data)
    _write_cache(path, data)
    return prompt


def _from_cache(path: Path, ref: str, why: str) -> Prompt:
    try:
        data = orjson.loads(path.read_bytes())
        prompt = Prompt(data, from_cache=True)
    except (OSError, ValueError, KeyError) as e:
        raise StoreUnavailable(
            f"{why}, and prompt '{ref}' is not in the local cache ({path}): {e}"
        ) from None
    log.warning("%s; using the cached copy of %s (v%s)", why, ref, prompt.version)
    return prompt
