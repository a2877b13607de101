"""Deployment routes in the gateway: canary split, replicas following the store,
``name@VERSION`` models, the canary decision, and bad input — on real Keel servers."""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from keel.cli import cli
from keel.deploy.compare import Limits, Side, decide
from keel.deploy.model import Target, parse_ref
from keel.deploy.store import KEEP, DeployStore, RouteChange

FAST = {"route_poll_interval_s": 0.05, "monitor_interval_s": 0.2}


def chat(url: str, model: str, text: str = "hi", **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def target(version: int, upstream: str, model: str = "m", **kw: Any) -> Target:
    return Target(model, version, "provider", upstream, provider="fake", **kw)


def wait_for(pred: Any, what: str, attempts: int = 200, pause_s: float = 0.05) -> Any:
    """Poll ``pred`` a bounded number of times (no timing is asserted)."""
    for _ in range(attempts):
        got = pred()
        if got:
            return got
        time.sleep(pause_s)
    raise AssertionError(f"never happened: {what}")


def served_by(url: str, model: str = "gpt") -> str:
    r = chat(url, model)
    assert r.status_code == 200, r.text
    return r.json()["model"]  # the fake answers with the upstream model it was sent


def test_canary_share_splits_traffic_by_version(keel_factory: Any) -> None:
    k = keel_factory(deploy=FAST)
    store = DeployStore(k.state.engine)
    store.set_route(
        RouteChange("gpt", "m", target(1, "fake-stable"), target(2, "fake-canary"), 0.3),
        actor="test",
    )
    wait_for(lambda: served_by(k.url) == "fake-canary", "the canary serves")
    k.flush()
    before = len(k.rows())
    n = 400
    with httpx.Client(base_url=k.url, timeout=30) as client:
        for i in range(n):
            body = {"model": "gpt", "messages": [{"role": "user", "content": f"call {i}"}]}
            assert client.post("/v1/chat/completions", json=body).status_code == 200
    rows = k.rows()[before:]
    by_version = Counter(r["route_version"] for r in rows)
    assert sum(by_version.values()) == n and set(by_version) == {"m@1", "m@2"}
    # Binomial(400, 0.3): 5 standard deviations either side cannot flake.
    sd = math.sqrt(n * 0.3 * 0.7)
    assert abs(by_version["m@2"] - 0.3 * n) < 5 * sd, by_version
    # each version went to its own upstream model, and the trace says which
    pairs = {(r["route_version"], r["upstream_model"]) for r in rows}
    assert pairs == {("m@1", "fake-stable"), ("m@2", "fake-canary")}
    assert {r["model"] for r in rows} == {"gpt"}


def test_route_changes_reach_a_replica_sharing_the_store(keel_factory: Any, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    a = keel_factory(deploy=FAST, database_url=db)
    b = keel_factory(deploy=FAST, database_url=db)
    store = DeployStore(a.state.engine)
    assert served_by(a.url) == served_by(b.url) == "fake"  # keel.yaml's alias
    rev = store.set_route(RouteChange("gpt", "m", target(3, "fake-v3")), actor="test")
    for k in (a, b):
        wait_for(lambda k=k: served_by(k.url) == "fake-v3", f"replica {k.url} serves v3")
        assert k.state.router.aliases["gpt"].route_version == "m@3"
        assert k.app.state.deploy.route_sync.seen["gpt"] == rev
    # stable null: back to the keel.yaml alias, again on both
    store.set_route(RouteChange("gpt", "m", None), actor="test")
    for k in (a, b):
        wait_for(lambda k=k: served_by(k.url) == "fake", f"replica {k.url} is back on keel.yaml")
    # an unservable route keeps what the replica served (and says why in the log)
    bad = Target("m", 4, "provider", "x", provider="not-configured")
    store.set_route(RouteChange("gpt", "m", bad), actor="test")
    wait_for(lambda: a.app.state.deploy.route_sync.seen["gpt"] == rev + 2, "bad route seen")
    assert served_by(a.url) == "fake"


def _register(url: str, model: str, deployment: dict[str, Any]) -> int:
    r = httpx.post(
        f"{url}/api/registry/models/{model}/versions", json={"deployment": deployment}, timeout=30
    )
    assert r.status_code == 201, r.text
    return r.json()["version"]


def test_a_version_is_a_model_of_its_own(keel_factory: Any, fake: Any) -> None:
    k = keel_factory(deploy=FAST)
    v = _register(k.url, "m", {"provider": "fake", "model": "fake-direct", "params": {"seed": 7}})
    fake.requests.clear()
    assert served_by(k.url, f"m@{v}") == "fake-direct"
    assert fake.requests[-1]["seed"] == 7  # the version's params reach the upstream
    assert served_by(k.url, f"m@v{v}") == "fake-direct"
    row = k.rows()[-1]
    assert (row["model"], row["route_version"]) == (f"m@v{v}", f"m@{v}")
    # unknown versions and names are a clear 404; nothing is routed to the alias
    for name in ("m@99", "nope@1", "m@", "gpt@1"):
        r = chat(k.url, name)
        assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"], name
    assert "m@1" not in {d["id"] for d in httpx.get(f"{k.url}/v1/models").json()["data"]}


def test_a_routed_prompt_is_rendered_for_calls_with_variables(keel_factory: Any, fake: Any) -> None:
    k = keel_factory(deploy=FAST)
    spec = {
        "name": "greet",
        "messages": [{"role": "user", "content": "Hello {{ name }}"}],
        "variables": {"name": {"type": "string"}},
    }
    assert httpx.post(f"{k.url}/api/prompts", json=spec, timeout=30).status_code in (200, 201)
    store = DeployStore(k.state.engine)
    store.set_route(
        RouteChange("gpt", "m", target(1, "fake-p", prompt="greet@1", params={"top_p": 0.5})),
        actor="test",
    )
    wait_for(lambda: served_by(k.url) == "fake-p", "route applied")
    body = {"model": "gpt", "variables": {"name": "Ada"}}
    r = httpx.post(f"{k.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Echo: Hello Ada"
    assert fake.requests[-1]["top_p"] == 0.5 and "variables" not in fake.requests[-1]
    # plain messages are passed as sent; the prompt is not forced on them
    assert chat(k.url, "gpt", "as is").json()["choices"][0]["message"]["content"] == "Echo: as is"
    # variables without a routed prompt: the usual error, nothing forwarded
    store.set_route(RouteChange("gpt", "m", target(2, "fake-q")), actor="test")
    wait_for(lambda: served_by(k.url) == "fake-q", "route applied")
    r = httpx.post(f"{k.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and "'messages' is required" in r.json()["error"]["message"]


def test_bad_input_is_refused_clearly(keel_factory: Any) -> None:
    k = keel_factory(deploy=FAST)
    r = httpx.get(f"{k.url}/api/deploy/nope", timeout=30)
    assert r.status_code == 404 and "never been deployed" in r.json()["error"]["message"]
    for action in ("promote", "rollback"):
        r = httpx.post(f"{k.url}/api/deploy/nope/{action}", json={}, timeout=30)
        assert r.status_code == 404, r.text
    r = httpx.get(f"{k.url}/api/deploy/deployments", params={"state": "bogus"}, timeout=30)
    assert r.status_code == 400 and "unknown state" in r.json()["error"]["message"]
    r = httpx.post(f"{k.url}/api/deploy/nope/promote", json={"oops": 1}, timeout=30)
    assert r.status_code == 400
    res = CliRunner().invoke(cli, ["deploy", "rollback", "nope", "--url", k.url])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == ["error: model 'nope' has no deployment to roll back"]
    res = CliRunner().invoke(cli, ["deploy", "status", "nope", "--url", "http://127.0.0.1:1"])
    assert res.exit_code == 1 and res.output.startswith("error: cannot reach Keel")
    assert httpx.get(f"{k.url}/api/deploy/deployments", timeout=30).json() == {"data": []}


def test_refs() -> None:
    assert parse_ref("m@3") == ("m", 3) and parse_ref("a.b-c@v12") == ("a.b-c", 12)
    for bad in ("m", "m@", "m@x", "@3", "m@production", "m@3@4"):
        assert parse_ref(bad) is None, bad
    t = target(2, "up", params={"t": 1})
    assert Target.from_json(t.to_json()) == t and t.ref == "m@2"


LIM = Limits(
    min_requests=50,
    max_error_rate_increase=0.02,
    max_p95_ratio=1.5,
    min_p95_increase_ms=50.0,
    max_cost_ratio=1.5,
    min_score_delta=-0.05,
    min_scores=10,
)


def side(
    ref: str,
    n: int,
    errors: int = 0,
    p95: float = 100.0,
    cost: float | None = 0.001,
    scores: dict[str, dict[str, float]] | None = None,
) -> Side:
    return Side(ref, n, errors, p95, cost, scores or {})


def _decide(c: Side, b: Side, elapsed: float = 60.0, **kw: Any) -> Any:
    return decide(c, b, LIM, elapsed_s=elapsed, window_s=60, max_window_s=600, **kw)


def test_decisions() -> None:
    base = side("m@1", 900, errors=9)
    ok = _decide(side("m@2", 100, errors=2), base)
    assert ok.action == "promote" and "error rate 2.00% vs 1.00%" in ok.reason
    assert _decide(side("m@2", 100), base, elapsed=30).action == "wait"
    bad = _decide(side("m@2", 100, errors=4), base)  # +3 points
    assert bad.action == "rollback" and bad.failed[0]["check"] == "error_rate"
    # errors roll back early, before the window ends; latency waits for it
    assert _decide(side("m@2", 100, errors=10), base, elapsed=5).action == "rollback"
    assert _decide(side("m@2", 100, p95=400), base, elapsed=5).action == "wait"
    slow = _decide(side("m@2", 100, p95=151), base)
    assert slow.action == "rollback" and "1.51x" in slow.reason
    # 3x slower but only by 20 ms: noise on a fast model, not a regression
    assert _decide(side("m@2", 100, p95=30), side("m@1", 900, p95=10)).action == "promote"
    dear = _decide(side("m@2", 100, cost=0.002), base)
    assert dear.action == "rollback" and dear.failed[0]["check"] == "cost_per_request"
    s_ok = {"helpful": {"count": 20, "mean": 0.8}}
    s_bad = {"helpful": {"count": 20, "mean": 0.7}}
    s_few = {"helpful": {"count": 5, "mean": 0.1}}
    b_s = side("m@1", 900, scores=s_ok)
    assert _decide(side("m@2", 100, scores=s_bad), b_s).action == "rollback"
    assert _decide(side("m@2", 100, scores=s_few), b_s).action == "promote"
    # unknown cost on either side: not compared, not a failure
    assert _decide(side("m@2", 100, cost=None), base).action == "promote"
    # not enough traffic: wait until the longest window, then fail closed (or promote)
    thin = side("m@2", 10)
    assert _decide(thin, base).action == "wait"
    late = decide(thin, base, LIM, elapsed_s=601, window_s=60, max_window_s=600)
    assert late.action == "rollback" and "not enough traffic" in late.reason
    late = decide(
        thin, base, LIM, elapsed_s=601, window_s=60, max_window_s=600, on_insufficient="promote"
    )
    assert late.action == "promote"


def test_deploy_settings_are_checked(fake: Any, tmp_path: Path) -> None:
    from conftest import make_settings
    from keel.app import create_app
    from keel.config import load_settings
    from keel.errors import ConfigError

    with pytest.raises(ConfigError, match="alias 'gpt' is already served by model 'a'"):
        load_settings(
            overrides={"deploy": {"models": {"a": {"alias": "gpt"}, "b": {"alias": "gpt"}}}}
        )
    with pytest.raises(ConfigError, match="canary_share"):
        load_settings(overrides={"deploy": {"canary_share": 1.5}})
    s = make_settings(fake, tmp_path, deploy={"notify": ["pager"]})
    with pytest.raises(ConfigError, match=r"deploy.notify: unknown alert channel\(s\) pager"):
        create_app(s)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_transition_happens_once_whoever_races_for_it(
    backend: str, tmp_path: Path, request: Any
) -> None:
    import threading

    from keel.config import Settings
    from keel.deploy.service import DeployService
    from keel.store.engine import make_engine, migrate

    if backend == "postgresql":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'race.db'}"
    engine = make_engine(url)
    migrate(engine)
    store = DeployStore(engine)
    d = store.create(model="m", version=1, alias="gpt", canary_share=0.2, actor="t")
    assert store.transition(d["id"], "pending_validation", "validating", actor="t", reason="v")
    canary = RouteChange("gpt", "m", canary=target(1, "fake-1"), share=0.2)
    assert store.transition(d["id"], "validating", "canary", actor="t", reason="ok", route=canary)
    # eight racers: four promote, four roll back, all at once
    barrier = threading.Barrier(8)
    results: list[Any] = []

    def race(i: int) -> None:
        to = "promoted" if i % 2 else "rolled_back"
        stable = target(1, "fake-1") if to == "promoted" else None
        change = RouteChange("gpt", "m", stable if to == "promoted" else KEEP, None, 0.0)
        barrier.wait()
        results.append(
            store.transition(d["id"], "canary", to, actor=f"r{i}", reason=to, route=change)
        )

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    won = [r for r in results if r is not None]
    assert len(results) == 8 and len(won) == 1
    ev = store.events(d["id"])
    assert [e["seq"] for e in ev] == [1, 2, 3, 4] and ev[-1]["to_state"] == won[0]["state"]
    assert store.route("gpt")["revision"] == 2  # the canary, then the one decision
    # approvals racing for one model: each supersedes the last, one stays active
    svc = DeployService(engine, Settings.model_validate({"local": {"enabled": False}}))
    barrier = threading.Barrier(4)

    def approve(v: int) -> None:
        barrier.wait()
        svc.start("n", v, actor="t")

    threads = [threading.Thread(target=approve, args=(v,)) for v in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    rows = store.list("n")
    assert len(rows) == 4 and sum(r["state"] == "pending_validation" for r in rows) == 1
    assert {r["state"] for r in rows} == {"pending_validation", "cancelled"}
    assert all("superseded" in r["reason"] for r in rows if r["state"] == "cancelled")
