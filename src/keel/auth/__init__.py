"""Virtual API keys, roles, and the audit log of admin actions."""

from keel.auth.guard import RULES, AuthMiddleware, Rule, auth_enabled, write_audit
from keel.auth.keys import AuthError, Forbidden, KeyRecord, KeyStore

__all__ = [
    "RULES",
    "AuthError",
    "AuthMiddleware",
    "Forbidden",
    "KeyRecord",
    "KeyStore",
    "Rule",
    "auth_enabled",
    "write_audit",
]
