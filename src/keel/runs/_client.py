"""A small JSON client for Keel's REST API, with retries, shared by the runs SDK and CLIs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson

from keel.errors import Conflict, InvalidRequest, KeelError, NotFound, PayloadTooLarge

DEFAULT_URL = "http://127.0.0.1:4000"
_RETRY_STATUS = frozenset({502, 503, 504})
_BY_STATUS: dict[int, type[KeelError]] = {
    400: InvalidRequest,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
}


class KeelUnreachable(KeelError):
    """Keel's API could not be reached (or kept answering 5xx) after retries."""

    status = 503
    type = "unreachable"


def error_from(r: httpx.Response) -> KeelError:
    """The Keel error an API answer carries (its message, a subclass by status)."""
    try:
        err = r.json().get("error") or {}
        msg = err.get("message") or f"HTTP {r.status_code}"
        param = err.get("param")
    except Exception:
        msg, param = (r.text[:300] or f"HTTP {r.status_code}"), None
    cls = _BY_STATUS.get(r.status_code)
    if cls is not None:
        return cls(msg, param=param)
    e = KeelError(msg, status=r.status_code, param=param)
    e.type = "permission_error" if r.status_code in (401, 403) else "api_error"
    return e


class ApiClient:
    """``request`` answers the decoded JSON or raises a :class:`KeelError`.

    Connection failures and 502/503/504 are retried ``retries`` times with backoff.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self.retries = retries
        self.backoff_s = backoff_s

    def close(self) -> None:
        self.http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        content: Callable[[], Any] | None = None,
        retries: int | None = None,
    ) -> Any:
        """``content`` is a factory (a fresh file object per attempt) for raw uploads."""
        tries = 1 + (self.retries if retries is None else retries)
        last: Exception | None = None
        for attempt in range(tries):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            body = content() if content is not None else None
            if json is not None:  # orjson: a batch of metric points encodes 10x faster
                data, ctype = orjson.dumps(json), "application/json"
            else:
                data, ctype = body, "application/octet-stream"
            try:
                r = self.http.request(
                    method,
                    path,
                    params={k: v for k, v in (params or {}).items() if v is not None},
                    content=data,
                    headers={"content-type": ctype} if data is not None else None,
                )
            except httpx.HTTPError as e:
                last = e
                continue
            finally:
                if body is not None and hasattr(body, "close"):
                    body.close()
            if r.status_code in _RETRY_STATUS and attempt + 1 < tries:
                last = error_from(r)
                continue
            if r.status_code >= 400:
                raise error_from(r)
            return r.json() if r.content else None
        if isinstance(last, KeelError):
            raise last
        raise KeelUnreachable(
            f"cannot reach Keel at {self.url} ({type(last).__name__}: {last}); is `keel up` "
            "running? Set KEEL_URL."
        )
