"""``keel keys``: create, list and revoke virtual keys, on the store directly."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click

from keel._cli_util import cli_user as _user
from keel.auth.keys import ROLES, KeyRecord, KeyStore, parse_budget, parse_expires

config_option = click.option(
    "--config", "config", default=None, help="keel.yaml [default: ./keel.yaml if present]."
)


def _open(config: str | None) -> tuple[KeyStore, Any]:
    from keel.cli import _fail, _settings
    from keel.errors import KeelError
    from keel.store.engine import make_engine, migrate

    s = _settings(config)
    engine = make_engine(s.effective_database_url)
    try:
        migrate(engine)
    except KeelError as e:
        _fail(str(e))
    return KeyStore(engine, redis_url=s.redis_url, cache_s=s.auth.key_cache_s), engine


def _audit(engine: Any, action: str, rec: KeyRecord, **details: Any) -> None:
    from keel.auth.guard import write_audit

    try:
        write_audit(engine, _user(), action, rec.id, {"name": rec.name, **details}, None)
    except Exception as e:  # the change is made; a missing audit row must not hide that
        click.echo(f"warning: could not write the audit log: {e}", err=True)


def _date(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def _limits(k: KeyRecord) -> str:
    parts = []
    if k.budget_usd is not None:
        parts.append(f"${k.budget_usd:g}/{k.budget_period or 'month'}")
    if k.rpm is not None:
        parts.append(f"{k.rpm} rpm")
    if k.tpm is not None:
        parts.append(f"{k.tpm} tpm")
    if k.models is not None:
        parts.append("models=" + ",".join(sorted(k.models)))
    return " ".join(parts) or "-"


@click.group("keys")
def keys() -> None:
    """Virtual API keys: create (shown once), list, revoke."""


@keys.command("create")
@click.option("--name", required=True, help="Who or what uses the key.")
@click.option(
    "--role",
    type=click.Choice(ROLES),
    default="user",
    show_default=True,
    help="user: the gateway; read: + GET /api and /metrics; approver: + approvals; admin: all.",
)
@click.option("--budget-usd", default=None, help="Spend limit: 50 (per month), 50/month, 10/day.")
@click.option("--rpm", type=click.IntRange(min=1), default=None, help="Requests per minute.")
@click.option("--tpm", type=click.IntRange(min=1), default=None, help="Tokens per minute.")
@click.option("--models", default=None, help="Allowed model aliases, comma-separated.")
@click.option("--expires", default=None, help="A date (2027-01-01) or an age (30d, 12h).")
@config_option
def create(
    name: str,
    role: str,
    budget_usd: str | None,
    rpm: int | None,
    tpm: int | None,
    models: str | None,
    expires: str | None,
    config: str | None,
) -> None:
    """Create a key and print its secret, once."""
    from keel.cli import _fail
    from keel.errors import KeelError

    try:
        budget, period = parse_budget(budget_usd) if budget_usd else (None, "month")
        allowed = [m.strip() for m in models.split(",") if m.strip()] if models else None
        if models is not None and not allowed:
            _fail("--models needs at least one model alias (a,b)")
        expires_ms = parse_expires(expires) if expires else None
        store, engine = _open(config)
        rec, secret = store.create(
            name,
            role=role,
            budget_usd=budget,
            budget_period=period,
            rpm=rpm,
            tpm=tpm,
            models=allowed,
            expires_at_ms=expires_ms,
            created_by=_user(),
        )
    except KeelError as e:
        _fail(str(e))
        return
    _audit(engine, "cli keys create", rec, role=rec.role)
    click.echo(f"created key '{rec.name}' (id {rec.id}, role {rec.role}, limits {_limits(rec)})")
    click.echo("")
    click.echo(f"  {secret}")
    click.echo("")
    click.echo("Store it now: Keel keeps only its hash and will not show it again.")


@keys.command("list")
@config_option
def list_keys(config: str | None) -> None:
    """Every key: id, name, prefix, role, limits, expiry, revocation."""
    from keel.cli import _fail
    from keel.errors import KeelError

    store, _ = _open(config)
    try:
        rows = store.list()
    except KeelError as e:
        _fail(str(e))
        return
    if not rows:
        click.echo("no keys (create one with `keel keys create --name NAME`)")
        return
    table = [("ID", "NAME", "PREFIX", "ROLE", "LIMITS", "EXPIRES", "REVOKED")]
    table += [
        (k.id, k.name, k.prefix + "…", k.role, _limits(k), _date(k.expires_at_ms),
         _date(k.revoked_at_ms))
        for k in rows
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@keys.command("revoke")
@click.argument("key_id_or_prefix")
@config_option
def revoke(key_id_or_prefix: str, config: str | None) -> None:
    """Revoke a key now; every replica drops it (at once with Redis)."""
    from keel.cli import _fail
    from keel.errors import KeelError

    store, engine = _open(config)
    try:
        rec = store.revoke(key_id_or_prefix)
    except KeelError as e:
        _fail(str(e))
        return
    _audit(engine, "cli keys revoke", rec)
    click.echo(f"revoked key '{rec.name}' ({rec.prefix}…, id {rec.id})")
