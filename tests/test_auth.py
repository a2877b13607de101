"""Virtual keys, roles and the audit log: the real store, the real Redis, a real Keel."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from fastapi import Request

from conftest import KeelServer, make_settings
from keel.auth import KeyStore, auth_enabled
from keel.auth.cli import keys as keys_cli
from keel.auth.guard import required_roles
from keel.auth.keys import parse_budget, parse_expires
from keel.config import Settings
from keel.daemon import now_ms
from keel.errors import Conflict, InvalidRequest, NotFound, StoreUnavailable
from keel.store.engine import make_engine, migrate
from keel.testing.fake_upstream import _free_port

REDIS_URL = "redis://127.0.0.1:6379/0"
ADMIN_SECRET = "admin-env-secret-0123456789"
CHAT = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def engine(tmp_path: Path) -> Any:
    eng = make_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    migrate(eng)
    yield eng
    eng.dispose()


def _rows(engine: Any, table: str, where: str = "") -> list[dict[str, Any]]:
    with engine.connect() as c:
        return [dict(r._mapping) for r in c.execute(sa.text(f"SELECT * FROM {table} {where}"))]


def _poll(fn: Any, timeout: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        out = fn()
        if out or time.monotonic() > deadline:
            return out
        time.sleep(0.02)


# -- the store ----------------------------------------------------------------


async def test_create_verify_list_hashed(engine: Any) -> None:
    ks = KeyStore(engine, redis_url=None, cache_s=60)
    rec, secret = ks.create(
        "svc", role="read", budget_usd=50, rpm=600, tpm=100_000, models=["gpt", "emb"]
    )
    assert secret.startswith("sk-keel-") and len(secret) == 48
    assert rec.prefix == secret[:12] and rec.role == "read"
    assert rec.models == frozenset({"gpt", "emb"}) and rec.budget_period == "month"
    assert rec.allows_model("gpt") and not rec.allows_model("claude")
    assert await ks.verify(secret) == rec
    assert await ks.verify(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert await ks.verify("not-a-key") is None
    plain, _ = ks.create("plain")
    assert plain.allows_model("anything") and plain.role == "user"
    assert [k.id for k in ks.list()] == [plain.id, rec.id]  # newest first
    # Hashed: the secret is nowhere in the store, its sha256 is.
    dump = repr(_rows(engine, "api_keys")) + repr(_rows(engine, "audit_log"))
    assert secret not in dump and secret[12:] not in dump
    assert hashlib.sha256(secret.encode()).hexdigest() in dump


async def test_validation(engine: Any) -> None:
    ks = KeyStore(engine, redis_url=None, cache_s=60)
    for bad in (
        {"name": ""},
        {"name": "x", "role": "root"},
        {"name": "x", "budget_usd": -1},
        {"name": "x", "budget_period": "year"},
        {"name": "x", "rpm": 0},
        {"name": "x", "models": "gpt"},
        {"name": "x", "expires_at_ms": now_ms() - 1},
    ):
        with pytest.raises(InvalidRequest):
            ks.create(**bad)
    assert parse_budget("50") == (50.0, "month")
    assert parse_budget("10/day") == (10.0, "day")
    assert parse_budget("$5/week") == (5.0, "week")
    for bad in ("abc", "0", "5/year"):
        with pytest.raises(InvalidRequest):
            parse_budget(bad)
    t = now_ms()
    assert parse_expires("30d", at_ms=t) == t + 30 * 86_400_000
    assert parse_expires("2999-01-01") > t
    for bad in ("2001-01-01", "soon"):
        with pytest.raises(InvalidRequest):
            parse_expires(bad)


async def test_expiry_applies_on_cache_hits(engine: Any) -> None:
    ks = KeyStore(engine, redis_url=None, cache_s=60)
    rec, secret = ks.create("short", expires_at_ms=now_ms() + 300)
    assert await ks.verify(secret) == rec  # now cached for 60 s
    await asyncio.sleep(0.35)
    assert await ks.verify(secret) is None


async def test_revoke_locally_and_errors(engine: Any) -> None:
    ks = KeyStore(engine, redis_url=None, cache_s=60)
    rec, secret = ks.create("soon-gone")
    assert await ks.verify(secret) is not None
    out = await asyncio.to_thread(ks.revoke, rec.prefix + "…")
    assert out.revoked_at_ms is not None
    assert await ks.verify(secret) is None  # evicted from this process' cache at once
    with pytest.raises(Conflict):
        ks.revoke(rec.id)
    with pytest.raises(NotFound):
        ks.revoke("nope")


async def test_negative_cache_and_single_flight(engine: Any) -> None:
    ks = KeyStore(engine, redis_url=None, cache_s=60, negative_cache_s=0.2)
    unknown = "sk-keel-" + "x" * 40
    assert await ks.verify(unknown) is None
    assert await ks.verify(unknown) is None
    assert ks.lookups == 1
    await asyncio.sleep(0.25)
    assert await ks.verify(unknown) is None
    assert ks.lookups == 2
    # Garbage never reaches the store.
    assert await ks.verify("sk-" + "y" * 10) is None and ks.lookups == 2
    # Concurrent misses for one key: one store read.
    rec, secret = ks.create("burst")
    results = await asyncio.gather(*(ks.verify(secret) for _ in range(20)))
    assert all(r == rec for r in results) and ks.lookups == 3


async def test_store_down_keeps_known_keys(tmp_path: Path) -> None:
    eng = make_engine(f"sqlite:///{tmp_path / 'k.db'}")
    migrate(eng)
    ks = KeyStore(eng, redis_url=None, cache_s=0.01)
    _, secret = ks.create("known")
    assert await ks.verify(secret) is not None
    with eng.begin() as c:
        c.execute(sa.text("ALTER TABLE api_keys RENAME TO api_keys_gone"))
    await asyncio.sleep(0.02)
    assert await ks.verify(secret) is not None  # trusted: verified before
    with pytest.raises(StoreUnavailable):
        await ks.verify("sk-keel-" + "z" * 40)
    eng.dispose()


async def test_verify_cache_hit_is_cheap(engine: Any) -> None:
    ks = KeyStore(engine, redis_url=None, cache_s=60)
    _, secret = ks.create("fast")
    await ks.verify(secret)
    n = 20_000
    t = time.perf_counter()
    for _ in range(n):
        await ks.verify(secret)
    verify = time.perf_counter() - t
    import hashlib

    t = time.perf_counter()
    for _ in range(n):
        hashlib.sha256(secret.encode()).hexdigest()
    floor = time.perf_counter() - t
    print(f"verify on a cache hit: {verify / n * 1e6:.2f} µs (sha256 alone {floor / n * 1e6:.2f})")
    # No store round trip on a hit: within a small factor of hashing the secret.
    assert verify < 25 * floor + 0.05


# -- replicas and Redis ---------------------------------------------------------


@pytest.mark.postgres
async def test_revocation_reaches_other_replica_at_once(pg_url: str) -> None:
    e1, e2 = make_engine(pg_url), make_engine(pg_url)
    await asyncio.to_thread(migrate, e1)
    a = KeyStore(e1, redis_url=REDIS_URL, cache_s=60)
    b = KeyStore(e2, redis_url=REDIS_URL, cache_s=60)
    try:
        await a.start()
        await b.start()
        assert a.subscribed and b.subscribed
        rec, secret = await asyncio.to_thread(a.create, "shared", role="user")
        assert await b.verify(secret) == rec  # cached on b for 60 s
        await asyncio.to_thread(a.revoke, rec.id)
        t = time.monotonic()
        while await b.verify(secret) is not None:
            assert time.monotonic() - t < 0.5, "revocation did not reach the other replica"
            await asyncio.sleep(0.01)
    finally:
        await a.aclose()
        await b.aclose()
        e1.dispose()
        e2.dispose()


async def test_redis_down_falls_back_to_ttl(engine: Any, caplog: Any) -> None:
    dead = f"redis://127.0.0.1:{_free_port()}/0"
    caplog.set_level(logging.WARNING, logger="keel.auth")
    a = KeyStore(engine, redis_url=dead, cache_s=0.3)
    b = KeyStore(engine, redis_url=dead, cache_s=0.3)
    try:
        await a.start()
        await b.start()
        assert not b.subscribed
        assert any("unreachable" in r.getMessage() for r in caplog.records)
        rec, secret = a.create("r")
        assert await b.verify(secret) == rec
        await asyncio.to_thread(a.revoke, rec.id)  # publishing fails: logged, not raised
        assert any("could not publish" in r.getMessage() for r in caplog.records)
        assert await a.verify(secret) is None
        assert await b.verify(secret) == rec  # b cannot know yet…
        await asyncio.sleep(0.35)
        assert await b.verify(secret) is None  # …until its cache entry expires
    finally:
        await a.aclose()
        await b.aclose()


# -- the middleware on a real Keel ------------------------------------------------


class Guarded:
    """A real Keel with keys on or off, as create_app wires them."""

    def __init__(self, fake: Any, data_dir: Path, enabled: bool) -> None:
        settings = make_settings(fake, data_dir, auth={"enabled": "on" if enabled else "off"})
        self.server = KeelServer(
            settings, environ={"FAKE_KEY": "sk-fake", "KEEL_ADMIN_KEY": ADMIN_SECRET}
        )
        app = self.server.app
        self.engine = self.server.state.engine
        migrate(self.engine)
        self.keystore = self.server.state.keystore

        @app.get("/v1/whoami")
        async def whoami(request: Request) -> dict[str, Any]:
            p = getattr(request.state, "keel_principal", None)
            return {"name": p.name, "role": p.role} if p else {"name": None}

        self.secrets = {
            role: self.keystore.create(f"{role}-key", role=role)[1]
            for role in ("user", "read", "approver", "admin")
        }
        self.server.start()
        self.url = self.server.url

    def req(self, method: str, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, self.url + path, headers=headers, timeout=10, **kw)


@pytest.fixture(scope="module")
def guarded(fake: Any, tmp_path_factory: Any) -> Any:
    g = Guarded(fake, tmp_path_factory.mktemp("guarded"), enabled=True)
    yield g
    g.server.stop()


def test_missing_or_bad_key_is_401(guarded: Guarded) -> None:
    for key in (None, "sk-keel-" + "q" * 40, "whatever"):
        r = guarded.req("GET", "/v1/models", key)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key"
        assert "q" * 20 not in err["message"]
    r = guarded.req("POST", "/v1/chat/completions", json=CHAT)
    assert r.status_code == 401


def test_public_paths_stay_public(guarded: Guarded) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        assert guarded.req("GET", path).status_code == 200, path


def test_roles(guarded: Guarded) -> None:
    s = guarded.secrets
    rule = {"name": "auth-rule", "signal": "latency_p95_ms"}
    rule["condition"] = {"op": "above", "threshold": 2000}
    # user: the gateway only
    r = guarded.req("POST", "/v1/chat/completions", s["user"], json=CHAT)
    assert r.status_code == 200, r.text
    r = httpx.get(guarded.url + "/v1/models", headers={"x-api-key": s["user"]})
    assert r.status_code == 200
    r = guarded.req("GET", "/api/traces", s["user"])
    assert r.status_code == 403
    err = r.json()["error"]
    assert err["type"] == "permission_error" and "read, approver or admin" in err["message"]
    assert guarded.req("GET", "/metrics", s["user"]).status_code == 403
    # read: GET /api/* and /metrics, no changes
    assert guarded.req("GET", "/api/traces", s["read"]).status_code == 200
    assert guarded.req("GET", "/metrics", s["read"]).status_code == 200
    r = guarded.req("POST", "/api/alerts/rules", s["read"], json=rule)
    assert r.status_code == 403 and "role admin" in r.json()["error"]["message"]
    assert guarded.req("GET", "/api/keys", s["read"]).status_code == 403
    # approver: approvals, not other changes
    assert guarded.req("POST", "/api/alerts/rules", s["approver"], json=rule).status_code == 403
    assert required_roles("POST", "/api/registry/m/versions/3/approve") == {"approver", "admin"}
    assert required_roles("POST", "/api/registry/m/versions/3") == {"admin"}
    # admin: everything; the admin secret from the environment too
    assert guarded.req("POST", "/api/alerts/rules", s["admin"], json=rule).status_code == 201
    r = guarded.req("DELETE", "/api/alerts/rules/auth-rule", ADMIN_SECRET)
    assert r.status_code == 204
    assert guarded.req("GET", "/api/keys", ADMIN_SECRET).status_code == 200


def test_principal_reaches_routes(guarded: Guarded) -> None:
    r = guarded.req("GET", "/v1/whoami", guarded.secrets["read"])
    assert r.json() == {"name": "read-key", "role": "read"}
    r = guarded.req("GET", "/v1/whoami", ADMIN_SECRET)
    assert r.json() == {"name": "admin-env", "role": "admin"}


def test_mutations_are_audited(guarded: Guarded) -> None:
    s = guarded.secrets
    rule = {"name": "audited", "signal": "latency_p95_ms"}
    rule["condition"] = {"op": "above", "threshold": 1}
    assert guarded.req("POST", "/api/alerts/rules", s["admin"], json=rule).status_code == 201
    assert guarded.req("POST", "/api/alerts/rules", s["admin"], json=rule).status_code == 409
    assert guarded.req("DELETE", "/api/alerts/rules/audited", s["read"]).status_code == 403
    assert guarded.req("GET", "/api/traces", s["admin"]).status_code == 200

    def rows() -> list[dict[str, Any]]:
        out = _rows(guarded.engine, "audit_log", "ORDER BY ts_ms, id")
        return [r for r in out if "/api/alerts/rules" in r["action"]] if len(out) else []

    got = _poll(lambda: len(rows()) >= 3 and rows())
    seen = {(r["action"], r["status"], r["principal"].split(" ")[0]) for r in got}
    assert ("POST /api/alerts/rules", 201, "admin-key") in seen
    assert ("POST /api/alerts/rules", 409, "admin-key") in seen
    assert ("DELETE /api/alerts/rules/audited", 403, "read-key") in seen
    assert all(r["action"].split(" ")[0] != "GET" for r in _rows(guarded.engine, "audit_log"))
    admin_id = next(k.id for k in guarded.keystore.list() if k.name == "admin-key")
    assert any(admin_id in r["principal"] for r in got)
    r = guarded.req("GET", "/api/audit?limit=500&since=1h", s["read"])
    assert r.status_code == 200
    data = r.json()["data"]
    assert [d["ts_ms"] for d in data] == sorted((d["ts_ms"] for d in data), reverse=True)
    assert data[0]["details"]["client"] == "127.0.0.1"


def test_keys_rest_api(guarded: Guarded) -> None:
    body = {"name": "ci", "role": "user", "rpm": 60, "models": ["gpt"], "expires": "30d"}
    r = guarded.req("POST", "/api/keys", ADMIN_SECRET, json=body)
    assert r.status_code == 201, r.text
    made = r.json()
    secret = made["secret"]
    assert secret.startswith("sk-keel-") and "not show it again" in made["warning"]
    assert made["created_by"] == "admin-env" and made["expires_at_ms"] > now_ms()
    listing = guarded.req("GET", "/api/keys", ADMIN_SECRET)
    assert secret not in listing.text and secret[12:] not in listing.text
    row = next(k for k in listing.json()["data"] if k["id"] == made["id"])
    assert "secret" not in row and "hash" not in row and row["prefix"] == secret[:12]
    assert guarded.req("POST", "/v1/chat/completions", secret, json=CHAT).status_code == 200
    r = guarded.req("DELETE", f"/api/keys/{made['id']}", ADMIN_SECRET)
    assert r.status_code == 200 and r.json()["revoked_at_ms"]
    assert guarded.req("POST", "/v1/chat/completions", secret, json=CHAT).status_code == 401
    assert guarded.req("DELETE", f"/api/keys/{made['id']}", ADMIN_SECRET).status_code == 409
    assert guarded.req("DELETE", "/api/keys/nope", ADMIN_SECRET).status_code == 404
    for bad in ({"name": "x", "role": "root"}, {"name": "x", "expires": "yesterday"}, {}):
        r = guarded.req("POST", "/api/keys", ADMIN_SECRET, json=bad)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    got = _poll(
        lambda: [
            r
            for r in _rows(guarded.engine, "audit_log")
            if r["action"] == "POST /api/keys" and r["target"] == made["id"]
        ]
    )
    assert got and got[0]["principal"] == "admin-env" and got[0]["status"] == 201


def test_disabled_passes_everything(fake: Any, tmp_path: Path) -> None:
    g = Guarded(fake, tmp_path / "open", enabled=False)
    try:
        assert g.req("POST", "/v1/chat/completions", json=CHAT).status_code == 200
        assert g.req("GET", "/api/traces").status_code == 200
        assert g.req("GET", "/v1/whoami").json() == {"name": None}
    finally:
        g.server.stop()


def test_auth_enabled_modes() -> None:
    def s(host: str, mode: str = "auto") -> Settings:
        return Settings(host=host, auth={"enabled": mode})

    assert not auth_enabled(s("127.0.0.1"))
    assert not auth_enabled(s("127.0.0.5"))
    assert not auth_enabled(s("::1"))
    assert not auth_enabled(s("localhost"))
    assert auth_enabled(s("0.0.0.0"))
    assert auth_enabled(s("10.1.2.3"))
    assert auth_enabled(s("127.0.0.1", "on"))
    assert not auth_enabled(s("0.0.0.0", "off"))


# -- the CLI --------------------------------------------------------------------


def test_cli_create_list_revoke(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("USER", "tester")
    for var in ("KEEL_CONFIG", "KEEL_DATABASE_URL", "KEEL_REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    cfg = tmp_path / "keel.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\nlocal:\n  enabled: false\n")
    run = CliRunner().invoke
    args = ["--name", "ci", "--role", "read", "--budget-usd", "10/day", "--rpm", "60"]
    args += ["--models", "gpt,claude", "--expires", "30d", "--config", str(cfg)]
    res = run(keys_cli, ["create", *args])
    assert res.exit_code == 0, res.output
    secret = next(w for w in res.output.split() if w.startswith("sk-keel-"))
    assert "will not show it again" in res.output

    res = run(keys_cli, ["list", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "ci" in res.output and secret[:12] in res.output and secret not in res.output
    assert "$10/day" in res.output and "60 rpm" in res.output

    res = run(keys_cli, ["revoke", secret[:12], "--config", str(cfg)])
    assert res.exit_code == 0 and "revoked" in res.output, res.output
    res = run(keys_cli, ["revoke", secret[:12], "--config", str(cfg)])
    assert res.exit_code == 1 and "already revoked" in res.output
    res = run(keys_cli, ["create", "--name", "x", "--budget-usd", "lots", "--config", str(cfg)])
    assert res.exit_code == 1 and res.output.startswith("error:")
    assert len(res.output.strip().splitlines()) == 1

    eng = make_engine(f"sqlite:///{tmp_path / 'data' / 'keel.db'}")
    try:
        (key,) = KeyStore(eng, redis_url=None, cache_s=1).list()
        assert key.revoked_at_ms and key.role == "read" and key.budget_usd == 10
        assert key.models == frozenset({"gpt", "claude"}) and key.created_by == "cli:tester"
        audit = _rows(eng, "audit_log", "ORDER BY ts_ms")
        assert [a["action"] for a in audit] == ["cli keys create", "cli keys revoke"]
        assert {a["principal"] for a in audit} == {"cli:tester"}
        assert all(a["target"] == key.id for a in audit)
    finally:
        eng.dispose()
