"""Alerts end to end: traffic through the gateway → rule → state machine → real receivers."""

from __future__ import annotations

import socket
import threading
import time
from email import message_from_bytes, policy
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from aiosmtpd.controller import Controller
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from conftest import KeelServer, make_settings
from keel.app import create_app
from keel.cli import cli
from keel.config import Settings
from keel.errors import ConfigError
from keel.testing.fake_upstream import _free_port


class Receiver:
    """A real HTTP server on loopback that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"

        async def hook(request: Request) -> JSONResponse:
            self.bodies.append(orjson.loads(await request.body()))
            return JSONResponse({"ok": True})

        app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
        self.server = uvicorn.Server(
            uvicorn.Config(app, port=self.port, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def alerts(self, kind: str | None = None) -> list[dict[str, Any]]:
        out = [a for b in self.bodies for a in b["alerts"]]
        return [a for a in out if kind is None or a["kind"] == kind]

    def wait_for(self, kind: str, n: int = 1, timeout: float = 20) -> list[dict[str, Any]]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(self.alerts(kind)) >= n:
                return self.alerts(kind)
            time.sleep(0.05)
        raise AssertionError(f"no {kind} alert arrived; got {self.bodies}")


@pytest.fixture
def receiver():
    r = Receiver()
    r.thread.start()
    while not r.server.started:
        time.sleep(0.01)
    yield r
    r.server.should_exit = True
    r.thread.join(5)


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(message_from_bytes(envelope.content, policy=policy.default))
        return "250 OK"


def alerting(receiver: Receiver, *rules: dict[str, Any], **over: Any) -> dict[str, Any]:
    return {
        "alerts": {
            "evaluation_interval_s": 0.2,
            "delivery_backoff_s": 0.05,
            "channels": {
                "hook": {"kind": "webhook", "url": receiver.url},
                **over.pop("channels", {}),
            },
            "rules": list(rules),
            **over,
        }
    }


ERROR_RULE = {
    "name": "gpt-errors",
    "signal": "error_rate",
    "window": "5m",
    "for": "0.4s",
    "condition": {"op": "above", "threshold": 0.5},
    "group_by": ["model"],
    "severity": "critical",
    "channels": ["hook"],
    "description": "More than half of the calls fail.",
}


def chat(keel, content: str, model: str = "gpt") -> int:
    return httpx.post(
        keel.url + "/v1/chat/completions",
        timeout=10,
        json={"model": model, "messages": [{"role": "user", "content": content}]},
    ).status_code


def wait_state(keel, rule: str, state: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        data = httpx.get(keel.url + "/api/alerts", params={"state": "all", "rule": rule}).json()
        for a in data["data"]:
            if a["state"] == state:
                return a
        time.sleep(0.05)
    raise AssertionError(f"{rule} never reached {state}: {data}")


@pytest.mark.slow
def test_errors_fire_notify_and_resolve(keel_factory, receiver):
    keel = keel_factory(**alerting(receiver, ERROR_RULE))
    for _ in range(4):
        assert chat(keel, "[[fake: error=500]]") == 502
    keel.flush()
    (firing,) = receiver.wait_for("firing")
    assert firing["rule"] == "gpt-errors" and firing["labels"] == {"model": "gpt"}
    assert firing["severity"] == "critical" and firing["value"] == 1.0
    assert "error_rate" in firing["summary"] and "100%" in firing["summary"]
    assert "traces" in firing["links"] and "status=error" in firing["links"]["traces"]
    a = wait_state(keel, "gpt-errors", "firing")
    assert a["labels"] == {"model": "gpt"} and a["value"] == 1.0
    # it went through pending first (held for `for: 0.4s`), then fired
    assert [e["kind"] for e in a["history"]][-2:] == ["firing", "pending"]
    pending_at = a["history"][-1]["ts_ms"]
    assert a["history"][-2]["ts_ms"] - pending_at >= 400
    # the model recovers: plenty of good calls bring the rate under the threshold
    for _ in range(8):
        assert chat(keel, "hello") == 200
    keel.flush()
    (resolved,) = receiver.wait_for("resolved")
    assert resolved["rule"] == "gpt-errors" and resolved["value"] <= 0.5
    assert len(receiver.alerts("firing")) == 1  # said once, not every tick
    res = CliRunner().invoke(cli, ["alerts", "list", "--url", keel.url, "--state", "all"])
    assert res.exit_code == 0 and "resolved" in res.output and "gpt-errors" in res.output


@pytest.mark.slow
def test_restart_while_firing_neither_loses_nor_resends(fake, tmp_path, receiver):
    settings = make_settings(fake, tmp_path / "data", **alerting(receiver, ERROR_RULE))
    first = KeelServer(settings).start()
    try:
        for _ in range(3):
            chat(first, "[[fake: error=500]]")
        first.flush()
        receiver.wait_for("firing")
    finally:
        first.stop()
    second = KeelServer(settings).start()
    try:
        a = wait_state(second, "gpt-errors", "firing")
        assert a["last_notified_ms"] is not None
        engine_daemon = next(d for d in second.state.daemons if d.name == "alerts")
        ticks = engine_daemon.stats.ticks
        deadline = time.time() + 10
        while engine_daemon.stats.ticks < ticks + 5 and time.time() < deadline:
            time.sleep(0.05)
        assert engine_daemon.stats.ticks >= ticks + 5
        assert len(receiver.alerts("firing")) == 1, receiver.bodies
    finally:
        second.stop()


@pytest.mark.slow
def test_unresponsive_component_alert(keel_factory, receiver):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    rule = {
        "name": "vector-db-down",
        "signal": "component_down_seconds",
        "window": "5m",
        "condition": {"op": "above", "threshold": 0.3},
        "group_by": ["component"],
        "severity": "critical",
        "channels": ["hook"],
    }
    keel = keel_factory(
        components=[
            {
                "name": "vectors",
                "kind": "tcp",
                "host": "127.0.0.1",
                "port": port,
                "interval_s": 0.1,
                "timeout_s": 0.5,
            }
        ],
        monitoring={"probe_interval_s": 0.1, "probe_providers": False},
        **alerting(receiver, rule),
    )
    deadline = time.time() + 10
    while time.time() < deadline:
        comps = httpx.get(keel.url + "/api/components").json()["data"]
        if comps and comps[0]["up"]:
            break
        time.sleep(0.05)
    assert comps[0]["up"] is True
    listener.close()  # the component stops answering
    (firing,) = receiver.wait_for("firing")
    assert firing["rule"] == "vector-db-down" and firing["labels"] == {"component": "vectors"}
    assert "component" in firing["links"]


@pytest.mark.slow
def test_email_channel_and_grouping(keel_factory, receiver):
    box = Mailbox()
    ctl = Controller(box, hostname="127.0.0.1", port=_free_port())
    ctl.start()
    try:
        email = {
            "kind": "email",
            "smtp_host": "127.0.0.1",
            "smtp_port": ctl.port,
            "starttls": False,
            "sender": "keel@example.test",
            "to": ["oncall@example.test"],
        }
        rules = [
            {**ERROR_RULE, "channels": ["hook", "mail"], "for": 0},
            {
                "name": "any-traffic",
                "signal": "requests",
                "window": "5m",
                "for": 0,
                "condition": {"op": "above", "threshold": 0},
                "channels": ["hook", "mail"],
            },
        ]
        keel = keel_factory(**alerting(receiver, *rules, channels={"mail": email}))
        for _ in range(3):
            chat(keel, "[[fake: error=503]]")
        keel.flush()
        receiver.wait_for("firing", 2)
        # both rules fired in the same tick: one webhook POST and one e-mail carry both
        assert len(receiver.bodies) == 1 and len(receiver.bodies[0]["alerts"]) == 2
        deadline = time.time() + 10
        while not box.messages and time.time() < deadline:
            time.sleep(0.05)
        (msg,) = box.messages
        assert msg["To"] == "oncall@example.test" and "2 alerts firing" in msg["Subject"]
        body = msg.get_body(("plain",)).get_content()
        assert "gpt-errors" in body and "any-traffic" in body and "above 50%" in body
        deliveries = httpx.get(keel.url + "/api/alerts/deliveries").json()["data"]
        assert {d["channel"] for d in deliveries} == {"hook", "mail"}
        assert all(d["status"] == "sent" for d in deliveries)
    finally:
        ctl.stop()


@pytest.mark.slow
def test_silence_mutes_until_it_ends(keel_factory, receiver):
    keel = keel_factory(**alerting(receiver, {**ERROR_RULE, "for": 0}))
    r = httpx.post(
        keel.url + "/api/alerts/silences",
        json={"rule": "gpt-errors", "duration": "1.5s", "comment": "deploying"},
    )
    assert r.status_code == 201
    chat(keel, "[[fake: error=500]]")
    keel.flush()
    a = wait_state(keel, "gpt-errors", "firing")
    assert a["silenced"] is True
    time.sleep(0.5)
    assert receiver.alerts("firing") == []
    (firing,) = receiver.wait_for("firing", timeout=10)  # announced once the silence ends
    assert firing["rule"] == "gpt-errors"
    hist = wait_state(keel, "gpt-errors", "firing")["history"]
    assert "silenced" in [e["kind"] for e in hist]


def test_rules_api_crud_and_bad_rules(keel_factory, receiver):
    keel = keel_factory(**alerting(receiver, ERROR_RULE))
    api = keel.url + "/api/alerts/rules"
    rule = {
        "name": "slow-p95",
        "signal": "latency_p95_ms",
        "window": "10m",
        "for": "2m",
        "condition": {"op": "above", "threshold": 2000},
        "channels": ["hook"],
    }
    assert httpx.post(api, json=rule).status_code == 201
    assert httpx.post(api, json=rule).status_code == 409
    names = {(r["name"], r["source"]) for r in httpx.get(api).json()["data"]}
    assert names == {("gpt-errors", "config"), ("slow-p95", "api")}
    r = httpx.put(
        api + "/slow-p95",
        json={
            **rule,
            "condition": {"op": "above", "threshold": 1500, "mode": "change", "compare_to": "1d"},
        },
    )
    assert r.status_code == 200 and r.json()["spec"]["condition"]["mode"] == "change"
    assert httpx.put(api + "/gpt-errors", json=ERROR_RULE).status_code == 409
    assert httpx.delete(api + "/gpt-errors").status_code == 409
    for bad, needle in [
        ({**rule, "name": "x", "signal": "vibes"}, "unknown signal 'vibes'"),
        ({**rule, "name": "x", "channels": ["pager"]}, "unknown channel 'pager'"),
        (
            {**rule, "name": "x", "condition": {"op": "above", "threshold": "high"}},
            "condition.threshold",
        ),
        ({**rule, "name": "x", "group_by": ["colour"]}, "group_by"),
        ({**rule, "name": "x", "window": "soon"}, "window"),
    ]:
        r = httpx.post(api, json=bad)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    assert httpx.delete(api + "/slow-p95").status_code == 204
    assert httpx.delete(api + "/slow-p95").status_code == 404
    signals = httpx.get(keel.url + "/api/alerts/signals").json()["data"]
    assert {"error_rate", "component_down_seconds", "no_traffic"} <= {s["name"] for s in signals}


def test_keel_alerts_test_command(keel_factory, receiver):
    keel = keel_factory(**alerting(receiver))
    res = CliRunner().invoke(cli, ["alerts", "test", "hook", "--url", keel.url])
    assert res.exit_code == 0, res.output
    assert receiver.bodies and receiver.bodies[0]["alerts"][0]["kind"] == "test"
    res = CliRunner().invoke(cli, ["alerts", "test", "nope", "--url", keel.url])
    assert res.exit_code == 1 and "no channel named 'nope'" in res.output


def test_bad_rules_are_rejected_at_start_and_by_config_check(fake, tmp_path):
    s = make_settings(
        fake,
        tmp_path,
        alerts={
            "rules": [
                {"name": "r", "signal": "vibes", "condition": {"op": "above", "threshold": 1}}
            ]
        },
    )
    with pytest.raises(ConfigError, match=r"alerts\.rules\.0 \(r\)\.signal: unknown signal"):
        create_app(s)
    cfg = tmp_path / "keel.yaml"
    cfg.write_text(
        "alerts:\n  rules:\n    - {name: r, signal: error_rate, channels: [nope],"
        " condition: {op: above, threshold: 1}}\n"
    )
    res = CliRunner().invoke(cli, ["config", "check", "--config", str(cfg)])
    assert res.exit_code == 1 and "unknown channel 'nope'" in res.output
    cfg.write_text(
        "alerts:\n  rules:\n    - {name: r, signal: error_rate, group_by: [colour],"
        " condition: {op: above, threshold: 1}}\n"
    )
    res = CliRunner().invoke(cli, ["config", "check", "--config", str(cfg)])
    assert res.exit_code == 1 and "alerts.rules.0 (r).group_by" in res.output
    with pytest.raises(ValueError, match="duration"):
        Settings.model_validate(
            {
                "alerts": {
                    "rules": [
                        {
                            "name": "r",
                            "signal": "error_rate",
                            "window": "-5m",
                            "condition": {"op": "above", "threshold": 1},
                        }
                    ]
                }
            }
        )


@pytest.mark.slow
def test_long_firing_alert_is_renotified(keel_factory, receiver):
    keel = keel_factory(**alerting(receiver, {**ERROR_RULE, "for": 0}, renotify_interval_s=0.6))
    chat(keel, "[[fake: error=500]]")
    keel.flush()
    receiver.wait_for("firing")
    (again,) = receiver.wait_for("renotify", timeout=10)[:1]
    assert again["rule"] == "gpt-errors" and "STILL FIRING" in again["summary"]
    assert len(receiver.alerts("firing")) == 1


def test_deliveries_are_counted_in_metrics(keel_factory, receiver):
    from prometheus_client.parser import text_string_to_metric_families

    keel = keel_factory(**alerting(receiver))
    res = CliRunner().invoke(cli, ["alerts", "test", "hook", "--url", keel.url])
    assert res.exit_code == 0, res.output
    samples = {
        (s.name, s.labels.get("channel"), s.labels.get("status")): s.value
        for fam in text_string_to_metric_families(httpx.get(keel.url + "/metrics").text)
        for s in fam.samples
    }
    assert samples[("keel_alert_deliveries_total", "hook", "sent")] == 1
