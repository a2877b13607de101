"""Component health: every probe kind against a real server, the probe daemon (store rows,
gauges, lease) and /api/components."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from keel.app import build_providers
from keel.config import (
    ComponentSettings,
    LocalSettings,
    MonitoringSettings,
    ProviderSettings,
    Settings,
)
from keel.daemon import now_ms
from keel.errors import KeelError
from keel.gateway.providers.local import LocalProvider
from keel.gateway.providers.openai import OpenAIProvider
from keel.monitoring.components_api import make_router
from keel.monitoring.probes import PROBES, ProbeContext, ProbeDaemon, ProbeResult, provider_probe
from keel.store.engine import make_engine, migrate
from keel.store.tables import component_checks
from keel.testing.fake_upstream import FakeUpstream, _free_port

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'keel.db'}")
    migrate(eng)
    yield eng
    eng.dispose()


async def check(environ: dict[str, str] | None = None, **spec: Any) -> ProbeResult:
    spec.setdefault("name", spec["kind"])
    ctx = ProbeContext(environ or {}, timeout_s=0.5)
    try:
        return await PROBES[spec["kind"]](ComponentSettings(**spec), ctx).check()
    finally:
        await ctx.aclose()


def closed_port() -> int:
    return _free_port()  # nothing listens there once the probe socket is closed


class Stub:
    """A real HTTP server (uvicorn, own thread) answering with the given Starlette routes."""

    def __init__(self, routes: list[Route]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                Starlette(routes=routes),
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                lifespan="off",
                access_log=False,
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Stub:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "stub did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(5)


# -- http, tcp, timeouts ---------------------------------------------------------------


async def test_http_up_wrong_status_and_refused(fake: FakeUpstream) -> None:
    r = await check(kind="http", url=fake.root_url + "/health")
    assert r.up and r.error is None and r.latency_ms > 0

    r = await check(kind="http", url=fake.root_url + "/nope")
    assert not r.up and r.error is not None and r.error.startswith("HTTP 404 (expected 200)")

    r = await check(kind="http", url=fake.root_url + "/health", expected_status=204)
    assert not r.up and "HTTP 200 (expected 204)" in (r.error or "")

    r = await check(kind="http", url=f"http://127.0.0.1:{closed_port()}/health")
    assert not r.up and "Cannot connect" in (r.error or "")


async def test_tcp_up_and_down() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        r = await check(kind="tcp", host="127.0.0.1", port=port)
        assert r.up, r.error
    r = await check(kind="tcp", host="127.0.0.1", port=closed_port())
    assert not r.up and "ConnectionRefusedError" in (r.error or "")


async def test_a_server_that_never_answers_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept, read, never answer; returns when the client gives up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        t0 = time.monotonic()
        r = await check(kind="http", url=f"http://127.0.0.1:{port}/health", timeout_s=0.3)
        assert not r.up and r.error == "timed out after 0.3s"
        assert time.monotonic() - t0 < 2
        r = await check(kind="redis", url=f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
        assert not r.up and r.error is not None
    finally:
        server.close()
        await server.wait_closed()


# -- openai and the gateway's providers -------------------------------------------------


async def test_openai_probe(fake: FakeUpstream) -> None:
    assert (await check(kind="openai", url=fake.url)).up

    env = {"PROBE_KEY": "sk-probe-secret"}
    r = await check(env, kind="openai", url=fake.url, model="fake", api_key_env="PROBE_KEY")
    assert r.up, r.error
    body, headers = fake.requests[-1], fake.headers[-1]
    assert body["model"] == "fake" and body["max_tokens"] == 1
    assert headers["authorization"] == "Bearer sk-probe-secret"

    r = await check(kind="openai", url=fake.url, model="fake:error=401")
    assert not r.up and r.error == "authentication failed (HTTP 401): fake upstream error 401"
    r = await check(kind="openai", url=fake.url, model="fake:error=503")
    assert not r.up and r.error == "HTTP 503: fake upstream error 503"

    r = await check({}, kind="openai", url=fake.url, api_key_env="PROBE_KEY")
    assert not r.up and "PROBE_KEY" in (r.error or "") and "not set" in (r.error or "")


async def test_provider_auto_probes(fake: FakeUpstream, tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {
            "data_dir": str(tmp_path),
            "local": {"enabled": False},
            "providers": {
                "fake": {"kind": "openai", "base_url": fake.url, "api_key_env": "FAKE_KEY"},
                "claude": {"kind": "anthropic", "base_url": fake.root_url},
                "nowhere": {"kind": "openai", "base_url": f"http://127.0.0.1:{closed_port()}/v1"},
            },
        }
    )
    providers = build_providers(settings, {"FAKE_KEY": "sk-fake"})
    providers["local"] = LocalProvider(
        "local", ProviderSettings(kind="local"), local=LocalSettings()
    )  # never started: not available
    ctx = ProbeContext({}, timeout_s=0.5)
    try:
        probes = {n: provider_probe(p, ctx) for n, p in providers.items()}
        assert probes["fake"].name == "provider:fake" and probes["fake"].kind == "openai"
        assert probes["claude"].kind == "anthropic"
        results = {n: await p.check() for n, p in probes.items()}
    finally:
        await ctx.aclose()
    assert results["fake"].up, results["fake"].error
    assert results["claude"].up, results["claude"].error
    assert not results["nowhere"].up and "Cannot connect" in (results["nowhere"].error or "")
    assert not results["local"].up
    assert results["local"].error == "the local provider has not been started"


async def test_provider_probe_auth_failure_and_server_error() -> None:
    async def models(request: Any) -> Response:
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        if key != "good":
            # Like OpenAI, the message quotes the key it was given.
            msg = f"Incorrect API key provided: {key}"
            return JSONResponse({"error": {"message": msg}}, status_code=401)
        return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)

    with Stub([Route("/v1/models", models)]) as stub:
        ctx = ProbeContext({}, timeout_s=0.5)
        try:
            ps = ProviderSettings(kind="openai", base_url=stub.url + "/v1")
            bad = await provider_probe(OpenAIProvider("o", ps, api_key="sk-wrong"), ctx).check()
            good = await provider_probe(OpenAIProvider("o", ps, api_key="good"), ctx).check()
        finally:
            await ctx.aclose()
    assert not bad.up
    # The key is never in an error.
    assert bad.error == "authentication failed (HTTP 401): Incorrect API key provided: ***"
    assert not good.up and good.error == "HTTP 503: overloaded"


# -- vector databases -----------------------------------------------------------------


async def test_redis_up_and_down() -> None:
    r = await check(kind="redis", url=REDIS_URL)
    assert r.up, r.error
    r = await check(kind="redis", url=f"redis://127.0.0.1:{closed_port()}/0")
    assert not r.up and "Connect call failed" in (r.error or "")


async def test_pgvector(pg_url: str) -> None:
    libpq = pg_url.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(libpq, autocommit=True) as c:
            c.execute("CREATE EXTENSION IF NOT EXISTS vector")
            c.execute("CREATE TABLE items (id int)")
        has_vector = True
    except psycopg.Error:
        has_vector = False
    r = await check(kind="pgvector", url=pg_url, timeout_s=3)
    if has_vector:
        assert r.up, r.error
        r = await check(kind="pgvector", url=pg_url, collection="items", timeout_s=3)
        assert r.up, r.error
        r = await check(kind="pgvector", url=pg_url, collection="missing", timeout_s=3)
        assert not r.up and "missing" in (r.error or "")
    else:
        # The usual case on this machine: the server has no pgvector.
        assert not r.up and r.error == "extension 'vector' is not installed in this database"
    r = await check(kind="pgvector", url=f"postgresql://postgres@127.0.0.1:{closed_port()}/x")
    assert not r.up and r.error


def _qdrant_stub() -> Stub:
    # No real Qdrant on this machine: a stub with exactly the endpoints the probe uses,
    # answering the way Qdrant does.
    def authed(request: Any) -> bool:
        return request.headers.get("api-key") == "qk"

    async def readyz(request: Any) -> Response:
        if not authed(request):
            return Response("Invalid api-key", status_code=401)
        return Response("all shards are ready", media_type="text/plain")

    async def collection(request: Any) -> Response:
        name = request.path_params["name"]
        if name != "docs":
            return JSONResponse(
                {"status": {"error": f"Not found: Collection `{name}` doesn't exist!"}},
                status_code=404,
            )
        return JSONResponse({"result": {"status": "green"}, "status": "ok"})

    return Stub([Route("/readyz", readyz), Route("/collections/{name}", collection)])


async def test_qdrant() -> None:
    env = {"QDRANT_KEY": "qk"}
    with _qdrant_stub() as q:
        ok = await check(env, kind="qdrant", url=q.url, api_key_env="QDRANT_KEY")
        coll = await check(
            env, kind="qdrant", url=q.url, api_key_env="QDRANT_KEY", collection="docs"
        )
        missing = await check(
            env, kind="qdrant", url=q.url, api_key_env="QDRANT_KEY", collection="nope"
        )
        nokey = await check(kind="qdrant", url=q.url)
    assert ok.up and coll.up, (ok.error, coll.error)
    assert not missing.up and missing.error == "collection 'nope' does not exist"
    assert (
        not nokey.up
        and nokey.error == "not ready: authentication failed (HTTP 401): Invalid api-key"
    )


async def test_chroma_v2_and_v1_fallback() -> None:
    # No real Chroma on this machine: stubs of a 1.x server (API v2) and an old 0.5 one (v1).
    async def heartbeat(request: Any) -> Response:
        return JSONResponse({"nanosecond heartbeat": time.time_ns()})

    def collection(prefix: str) -> Route:
        async def get(request: Any) -> Response:
            if request.path_params["name"] != "docs":
                return JSONResponse({"error": "NotFoundError"}, status_code=404)
            return JSONResponse({"id": "c1", "name": "docs"})

        return Route(prefix + "/collections/{name}", get)

    v2 = [
        Route("/api/v2/heartbeat", heartbeat),
        collection("/api/v2/tenants/default_tenant/databases/default_database"),
    ]
    v1 = [Route("/api/v1/heartbeat", heartbeat), collection("/api/v1")]
    for routes in (v2, v1):
        with Stub(routes) as c:
            assert (await check(kind="chroma", url=c.url)).up
            assert (await check(kind="chroma", url=c.url, collection="docs")).up
            r = await check(kind="chroma", url=c.url, collection="nope")
            assert not r.up and r.error == "collection 'nope' does not exist"
    with Stub([]) as c:
        r = await check(kind="chroma", url=c.url)
        assert not r.up and (r.error or "").startswith("heartbeat: HTTP 404")


# -- the daemon --------------------------------------------------------------------------


def _rows(engine: sa.Engine) -> list[dict[str, Any]]:
    with engine.connect() as c:
        q = sa.select(component_checks).order_by(component_checks.c.ts_ms)
        return [dict(r._mapping) for r in c.execute(q)]


def _daemon(
    engine: sa.Engine,
    fake: FakeUpstream,
    registry: CollectorRegistry | None = None,
    providers: dict[str, Any] | None = None,
    **monitoring: Any,
) -> ProbeDaemon:
    comps = [
        ComponentSettings(name="web", kind="http", url=fake.root_url + "/health"),
        ComponentSettings(name="db", kind="tcp", host="127.0.0.1", port=closed_port()),
        ComponentSettings(name="slow", kind="http", url=fake.root_url + "/health", interval_s=60),
    ]
    mon = MonitoringSettings(**{"probe_interval_s": 0.1, "probe_timeout_s": 0.5, **monitoring})
    return ProbeDaemon(engine, comps, providers or {}, mon, {}, registry or CollectorRegistry())


async def test_daemon_stores_rows_and_exports_gauges(
    engine: sa.Engine, fake: FakeUpstream, tmp_path: Path
) -> None:
    providers = build_providers(
        Settings.model_validate(
            {
                "data_dir": str(tmp_path),
                "local": {"enabled": False},
                "providers": {"fake": {"kind": "openai", "base_url": fake.url}},
            }
        ),
        {},
    )
    registry = CollectorRegistry()
    d = _daemon(engine, fake, registry, providers)
    assert d.interval_s == 0.1
    assert d.components() == [
        ("web", "http"),
        ("db", "tcp"),
        ("slow", "http"),
        ("provider:fake", "openai"),
    ]
    try:
        await d.run_once()
        await asyncio.sleep(0.12)
        await d.run_once()
    finally:
        await d.aclose()
    assert d.stats.failures == 0, d.stats.last_error
    rows = _rows(engine)
    count = {n: sum(r["component"] == n for r in rows) for n in ("web", "db", "slow")}
    assert count == {"web": 2, "db": 2, "slow": 1}  # "slow" is not due again for 60 s
    web = next(r for r in rows if r["component"] == "web")
    assert web["up"] and web["kind"] == "http" and web["latency_ms"] > 0 and web["error"] is None
    db = next(r for r in rows if r["component"] == "db")
    assert not db["up"] and "ConnectionRefusedError" in db["error"]
    assert d.latest["provider:fake"][1].up

    def gauge(name: str, component: str, kind: str) -> float | None:
        return registry.get_sample_value(name, {"component": component, "kind": kind})

    assert gauge("keel_component_up", "web", "http") == 1.0
    assert gauge("keel_component_up", "db", "tcp") == 0.0
    assert gauge("keel_component_up", "provider:fake", "openai") == 1.0
    assert 0 < (gauge("keel_component_probe_seconds", "web", "http") or 0) < 0.5

    off = _daemon(engine, fake, providers=providers, probe_providers=False)
    assert "provider:fake" not in dict(off.components())


async def eventually(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.05)


async def test_only_one_replica_runs_the_probes(engine: sa.Engine, fake: FakeUpstream) -> None:
    a, b = _daemon(engine, fake), _daemon(engine, fake)
    a._lease.holder, b._lease.holder = "replica-a", "replica-b"  # type: ignore[union-attr]
    a.start()
    b.start()
    try:
        await eventually(lambda: a.stats.ticks + b.stats.ticks >= 3)
        assert a.stats.leader != b.stats.leader
        leader, other = (a, b) if a.stats.leader else (b, a)
        assert leader.stats.ticks >= 3 and other.stats.ticks == 0
        # The leader stops and releases its lease: the other takes over.
        await leader.stop()
        await eventually(lambda: other.stats.ticks > 0)
        assert other.stats.leader and other.stats.ticks >= 1
    finally:
        await a.stop()
        await b.stop()


# -- /api/components -------------------------------------------------------------------


def _client(engine: sa.Engine, daemon: ProbeDaemon | None) -> TestClient:
    app = FastAPI()

    @app.exception_handler(KeelError)
    async def _keel_error(request: Request, exc: KeelError) -> JSONResponse:
        return JSONResponse(exc.to_body(), status_code=exc.status)

    app.include_router(make_router(engine, daemon))
    return TestClient(app)


def test_api_uptime_detail_and_404(engine: sa.Engine, fake: FakeUpstream) -> None:
    now = now_ms()
    hour = 3600 * 1000
    rows = [
        (now - 25 * hour, False, "old: outside the 24 h window"),
        (now - 20 * hour, True, None),
        (now - 10 * hour, False, "HTTP 503 (expected 200): down"),
        (now - 2 * hour, True, None),
        (now - 1000, True, None),
    ]
    with engine.begin() as c:
        c.execute(
            sa.insert(component_checks),
            [
                {
                    "ts_ms": ts,
                    "component": "web",
                    "kind": "http",
                    "up": up,
                    "latency_ms": 3.5,
                    "error": err,
                }
                for ts, up, err in rows
            ]
            + [
                {
                    "ts_ms": now - 500,
                    "component": "provider:fake",
                    "kind": "openai",
                    "up": False,
                    "latency_ms": 1.0,
                    "error": "authentication failed (HTTP 401): no",
                }
            ],
        )
    providers = {"fake": OpenAIProvider("fake", ProviderSettings(kind="openai", base_url=fake.url))}
    client = _client(engine, _daemon(engine, fake, providers=providers))

    data = {c["name"]: c for c in client.get("/api/components").json()["data"]}
    assert list(data) == ["web", "db", "slow", "provider:fake"]
    web = data["web"]
    assert web["up"] is True and web["kind"] == "http" and web["error"] is None
    assert web["checks_24h"] == 4 and web["uptime_24h"] == 0.75
    assert web["last_checked"].endswith("Z") and web["latency_ms"] == 3.5
    assert data["db"] == {
        "name": "db",
        "kind": "tcp",
        "up": None,
        "last_checked": None,
        "latency_ms": None,
        "error": None,
        "uptime_24h": None,
        "checks_24h": 0,
    }
    assert data["provider:fake"]["up"] is False
    assert data["provider:fake"]["uptime_24h"] == 0.0

    detail = client.get("/api/components/web").json()
    assert detail["uptime_24h"] == 0.75
    hist = detail["history"]
    assert len(hist) == 5 and [h["up"] for h in hist] == [True, True, False, True, False]
    assert hist[2]["error"] == "HTTP 503 (expected 200): down"
    assert hist == sorted(hist, key=lambda h: h["ts"], reverse=True)

    p = client.get("/api/components/provider:fake")
    assert p.status_code == 200 and p.json()["error"].startswith("authentication failed")

    missing = client.get("/api/components/nope")
    assert missing.status_code == 404
    err = missing.json()["error"]
    assert err["type"] == "not_found_error" and "web" in err["message"]

    # Any replica answers from the store, even one that runs no daemon.
    bare = _client(engine, None)
    names = [c["name"] for c in bare.get("/api/components").json()["data"]]
    assert names == ["provider:fake", "web"]
    assert bare.get("/api/components/web").json()["checks_24h"] == 4
    assert bare.get("/api/components/db").status_code == 404

    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"ComponentStatus", "ComponentDetail", "ComponentList"} <= set(schema)
