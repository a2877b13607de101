"""Shared fixtures: a real fake upstream, real Keel servers, real databases."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import uvicorn

from keel.app import create_app
from keel.config import Settings
from keel.testing.fake_upstream import FakeUpstream, _free_port

PG_ADMIN_URL = os.environ.get("KEEL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as f:
        yield f


def make_settings(fake: FakeUpstream, data_dir: Path, **over: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": str(data_dir),
        "local": {"enabled": False},
        "recorder": {"flush_interval_s": 0.05},
        "providers": {
            "fake": {
                "kind": "openai",
                "base_url": fake.url,
                "api_key_env": "FAKE_KEY",
                "timeout_s": 2.0,
            },
            "claude": {"kind": "anthropic", "base_url": fake.root_url, "timeout_s": 2.0},
            "nowhere": {
                "kind": "openai",
                "base_url": f"http://127.0.0.1:{_free_port()}/v1",
                "connect_timeout_s": 1.0,
            },
        },
        "models": {
            "gpt": {
                "deployments": [
                    {"provider": "fake", "model": "fake", "params": {"temperature": 0.1}}
                ]
            },
            "claude": "claude/fake-claude",
            "hang": "fake/fake:hang",
            "down": "nowhere/whatever",
            "emb": {"kind": "embedding", "deployments": [{"provider": "fake", "model": "e"}]},
        },
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return Settings.model_validate(base)


class KeelServer:
    """A real Keel (uvicorn) on a free loopback port, in a thread."""

    def __init__(self, settings: Settings, environ: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.app = create_app(settings, environ=environ or {"FAKE_KEY": "sk-fake"})
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                access_log=False,
                lifespan="on",
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def state(self) -> Any:
        return self.app.state.keel

    def start(self) -> KeelServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("keel did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def flush(self) -> None:
        assert self.state.recorder.flush(10), "recorder did not flush"

    def rows(self, table: str = "traces", where: str = "") -> list[dict[str, Any]]:
        self.flush()
        with self.state.engine.connect() as c:
            q = f"SELECT * FROM {table} {where}"
            return [dict(r._mapping) for r in c.execute(sa.text(q))]


@pytest.fixture
def keel_factory(fake: FakeUpstream, tmp_path: Path) -> Iterator[Any]:
    servers: list[KeelServer] = []

    def start(**over: Any) -> KeelServer:
        s = KeelServer(make_settings(fake, tmp_path / f"data{len(servers)}", **over)).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def keel(keel_factory: Any) -> KeelServer:
    return keel_factory()


def _pg_available() -> bool:
    try:
        eng = sa.create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 2})
        with eng.connect() as c:
            c.execute(sa.text("SELECT 1"))
        eng.dispose()
        return True
    except Exception:
        return False


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the machine's server, dropped afterwards."""
    if not _pg_available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL at 127.0.0.1:5432 is required in CI")
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432")
    name = f"keel_t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
            c.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
                ),
                {"n": name},
            )
            with contextlib.suppress(Exception):
                c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def set_pg_connections(url: str, allow: bool) -> None:
    """Make a test database refuse (and drop) connections, or accept them again."""
    name = url.rsplit("/", 1)[1]
    admin = sa.create_engine(url.rsplit("/", 1)[0] + "/test", isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow).lower()}'))
        if not allow:
            c.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :n AND pid <> pg_backend_pid()"
                ),
                {"n": name},
            )
    admin.dispose()
