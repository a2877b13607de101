"""Who may call what: an ASGI middleware in front of the whole app.

Rules are a module-level table (:data:`RULES`), first match wins, so a new
package adds its exceptions by inserting a :class:`Rule` before the general
``/api/`` ones. Mutating ``/api/*`` requests are written to the audit log after
they complete, in a worker thread, never delaying or failing the response.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import insert
from sqlalchemy.engine import Engine

from keel._ids import new_id
from keel.auth.keys import AuthError, Forbidden, KeyRecord, KeyStore
from keel.config import Settings
from keel.daemon import now_ms
from keel.errors import KeelError, StoreUnavailable
from keel.store.tables import audit_log

log = logging.getLogger("keel.auth")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ANY_KEY = frozenset({"user", "read", "approver", "admin"})
READERS = frozenset({"read", "approver", "admin"})
APPROVERS = frozenset({"approver", "admin"})
ADMINS = frozenset({"admin"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Telemetry, not changes: a training run posts a metric batch every few seconds.
_UNAUDITED = re.compile(r"^/api/runs/[^/]+/metrics$")


@dataclass(frozen=True)
class Rule:
    """Requests whose path matches ``pattern`` (and method is in ``methods``, when
    set) need a key with one of ``roles``; ``roles`` None means public."""

    pattern: str
    roles: frozenset[str] | None
    methods: frozenset[str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rx", re.compile(self.pattern))

    def matches(self, method: str, path: str) -> bool:
        return (self.methods is None or method in self.methods) and bool(
            self._rx.match(path)  # type: ignore[attr-defined]
        )


RULES: list[Rule] = [
    Rule(r"^/(healthz|readyz|docs|docs/oauth2-redirect|redoc|openapi\.json)$", None),
    Rule(r"^/v1(/|$)", ANY_KEY),
    # Keys grant access, so only admins see or change them.
    Rule(r"^/api/keys(/|$)", ADMINS),
    Rule(r"^/api/registry/.+/(approve|reject)$", APPROVERS, MUTATING),
    # Promoting or rolling back a deployment is an approver's call, like approving.
    Rule(r"^/api/deploy/[^/]+/(promote|rollback)$", APPROVERS, MUTATING),
    # Training jobs log their runs with a non-admin key (any role that is not read-only).
    Rule(r"^/api/runs(/|$)", frozenset({"user", "approver", "admin"}), MUTATING),
    # Applications fetch and preview prompts with the key they call the gateway with.
    Rule(r"^/api/prompts/resolve$", ANY_KEY, READ_METHODS),
    Rule(r"^/api/prompts/render$", ANY_KEY, frozenset({"POST"})),
    # Applications relay their users' ratings with the key they call the gateway with.
    Rule(r"^/api/traces/[^/]+/feedback$", ANY_KEY, frozenset({"POST"})),
    Rule(r"^/api(/|$)", READERS, READ_METHODS),
    Rule(r"^/api(/|$)", ADMINS),
    Rule(r"^/metrics$", READERS, READ_METHODS),
]
# Anything else (the dashboard, unknown paths) needs a valid key of any role.
DEFAULT_ROLES: frozenset[str] | None = ANY_KEY

ADMIN_ENV = KeyRecord(id="admin-env", name="admin-env", prefix="", role="admin")
# In-process callers (the online evaluators' AppModelClient) present a token made
# fresh by each process; it never leaves the process (not logged, not served).
INTERNAL = KeyRecord(id="internal", name="internal", prefix="", role="admin")
INTERNAL_HEADER = "x-keel-internal"
_INTERNAL_TOKEN = secrets.token_urlsafe(32)
_INTERNAL_DIGEST = hashlib.sha256(_INTERNAL_TOKEN.encode()).digest()


def internal_token() -> str:
    """This process's internal token, for in-process calls through the ASGI app only."""
    return _INTERNAL_TOKEN


_ROLE_ORDER = ("user", "read", "approver", "admin")


def required_roles(method: str, path: str) -> frozenset[str] | None:
    """The roles that may make this request (None: public)."""
    for rule in RULES:
        if rule.matches(method, path):
            return rule.roles
    return DEFAULT_ROLES


def is_loopback(host: str) -> bool:
    h = host.strip().strip("[]").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def auth_enabled(settings: Settings) -> bool:
    """``auth.enabled``: on, off, or auto (on unless Keel listens on loopback only)."""
    mode = settings.auth.enabled
    if mode == "auto":
        return not is_loopback(settings.host)
    return mode == "on"


def write_audit(
    engine: Engine,
    principal: str,
    action: str,
    target: str | None,
    details: dict[str, Any] | None,
    status: int | None,
) -> str:
    """Append one audit row; returns its id."""
    row_id = new_id()
    with engine.begin() as conn:
        conn.execute(
            insert(audit_log).values(
                id=row_id,
                ts_ms=now_ms(),
                principal=principal[:200],
                action=action[:100],
                target=target[:300] if target is not None else None,
                details=orjson.dumps(details).decode() if details is not None else None,
                status=status,
            )
        )
    return row_id


def _key_from(scope: Scope) -> str | None:
    bearer = api_key = None
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
        elif name == b"x-api-key":
            api_key = value.decode("latin-1").strip() or None
    return bearer or api_key


def _header(scope: Scope, name: bytes) -> str | None:
    for k, value in scope.get("headers") or ():
        if k == name:
            return value.decode("latin-1").strip()
    return None


def _masked(secret: str) -> str:
    return secret[:12] + "…" if len(secret) > 16 else "***"


def _roles_text(roles: frozenset[str]) -> str:
    names = [r for r in _ROLE_ORDER if r in roles]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


class AuthMiddleware:
    """Checks the key of every request against :data:`RULES` (when ``enabled``).

    The principal (a :class:`KeyRecord`; ``admin-env`` for the bootstrap secret)
    is put in ``scope["state"]["keel_principal"]``, i.e. ``request.state.keel_principal``.
    A route may set ``request.state.keel_audit`` to a dict: its ``target`` replaces
    the audited target, the rest is merged into the details.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        keystore: KeyStore,
        enabled: bool,
        admin_secret: str | None,
        engine: Engine,
    ) -> None:
        self.app = app
        self.keystore = keystore
        self.enabled = enabled
        self.engine = engine
        self._admin = hashlib.sha256(admin_secret.encode()).digest() if admin_secret else None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.enabled or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET") if scope["type"] == "http" else "GET"
        path = scope["path"]
        roles = required_roles(method, path)
        if roles is None:
            await self.app(scope, receive, send)
            return
        audited = method in MUTATING and (path == "/api" or path.startswith("/api/"))
        audited = audited and not _UNAUDITED.match(path)
        try:
            principal = await self._authenticate(scope)
        except KeelError as e:
            await self._deny(scope, send, e)
            return
        if principal.role not in roles:
            err = Forbidden(
                f"this key has role '{principal.role}'; {method} {path} needs role "
                f"{_roles_text(roles)}"
            )
            if audited:  # a refused change is worth knowing about
                self._audit(scope, principal, method, path, err.status)
            await self._deny(scope, send, err)
            return
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["keel_principal"] = principal
        if not audited:
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._audit(scope, principal, method, path, status)

    async def _authenticate(self, scope: Scope) -> KeyRecord:
        internal = _header(scope, INTERNAL_HEADER.encode())
        if internal is not None:
            if hmac.compare_digest(hashlib.sha256(internal.encode()).digest(), _INTERNAL_DIGEST):
                return INTERNAL
            raise AuthError("invalid internal token")
        secret = _key_from(scope)
        if secret is None:
            raise AuthError(
                "You didn't provide an API key. Send it in an Authorization header "
                "(Authorization: Bearer sk-keel-…) or an x-api-key header."
            )
        if self._admin is not None and hmac.compare_digest(
            hashlib.sha256(secret.encode()).digest(), self._admin
        ):
            return ADMIN_ENV
        try:
            rec = await self.keystore.verify(secret)
        except KeelError:
            raise
        except Exception as e:
            log.exception("key verification failed")
            raise StoreUnavailable("cannot verify the API key right now") from e
        if rec is None:
            raise AuthError(
                f"Incorrect API key provided: {_masked(secret)}. The key is unknown, "
                "revoked or expired; `keel keys list` shows the keys."
            )
        return rec

    async def _deny(self, scope: Scope, send: Send, err: KeelError) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": err.message[:120]})
            return
        headers = [(b"content-type", b"application/json")]
        if err.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        body = orjson.dumps(err.to_body())
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _audit(
        self, scope: Scope, principal: KeyRecord, method: str, path: str, status: int
    ) -> None:
        client = scope.get("client")
        details: dict[str, Any] = {"status": status, "client": client[0] if client else None}
        for name, value in scope.get("headers") or ():
            if name == b"x-forwarded-for":
                details["forwarded_for"] = value.decode("latin-1")[:200]
        params = scope.get("path_params") or {}
        target = ",".join(f"{k}={v}" for k, v in params.items()) if params else path
        extra = (scope.get("state") or {}).get("keel_audit")
        if isinstance(extra, dict):
            extra = dict(extra)
            target = str(extra.pop("target", target))
            details.update(extra)
        internal = principal is ADMIN_ENV or principal is INTERNAL
        who = principal.id if internal else principal.principal
        task = asyncio.get_running_loop().create_task(
            self._write(who, f"{method} {path}", target, details, status)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(
        self, who: str, action: str, target: str, details: dict[str, Any], status: int
    ) -> None:
        try:
            await asyncio.to_thread(write_audit, self.engine, who, action, target, details, status)
        except Exception:
            log.exception("could not write the audit row for %s by %s", action, who)
