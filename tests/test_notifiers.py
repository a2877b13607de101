"""Alert notifiers and delivery, against real parts.

A real SMTP server (aiosmtpd) and a real HTTP receiver (aiohttp.web) on
loopback capture exactly what Keel sends; the tests assert on the content a
person (or a receiving program) would read, and on the delivery records.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from multidict import CIMultiDict
from sqlalchemy.engine import Engine

from keel.alerts import messages as m
from keel.alerts.delivery import Dispatcher, recent
from keel.alerts.model import Notification
from keel.alerts.notifiers import Notifier, SharedSession
from keel.config import AlertsSettings, ChannelSettings
from keel.store.engine import make_engine, migrate
from keel.testing.fake_upstream import _free_port

# 2026-01-01 03:19 UTC; alerts below started 7 minutes earlier.
NOW = 1767237540000


def note(**over: Any) -> Notification:
    base: dict[str, Any] = {
        "rule": "high-error-rate",
        "kind": "firing",
        "severity": "critical",
        "signal": "error_rate",
        "labels": {"model": "gpt"},
        "value": 0.123,
        "threshold": 0.05,
        "op": "above",
        "mode": "value",
        "window_s": 300.0,
        "since_ms": NOW - 7 * 60_000,
        "ts_ms": NOW,
        "unit": "ratio",
        "description": "More than 5% of calls to gpt fail. Check the provider status page.",
        "runbook_url": "https://runbooks.example/error-rate",
        "links": {
            "dashboard": "http://keel.example/alerts?rule=high-error-rate",
            "traces": "http://keel.example/api/traces?model=gpt&status=error",
        },
    }
    base.update(over)
    return Notification(**base)


def group_of_three() -> list[Notification]:
    return [
        note(),
        note(labels={"model": "claude"}, value=0.2),
        note(
            rule="slow-p95",
            signal="latency_p95",
            kind="resolved",
            severity="warning",
            unit="ms",
            value=800.0,
            threshold=1500.0,
            since_ms=NOW - 25 * 60_000,
            labels={},
            description=None,
        ),
    ]


# --- real parts ------------------------------------------------------------------


class Receiver:
    """A real HTTP server on a free loopback port that records every request."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail_first = 0
        self.fail_status = 500
        self.retry_after: str | None = None
        self.status = 200
        self.reply = "ok"
        self.hang = False
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.calls.append(
            {
                "path": request.path_qs,
                "headers": CIMultiDict(request.headers),
                "body": body,
                "t": time.monotonic(),
            }
        )
        if self.hang:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await self._release.wait()
            return web.Response(text="too late")
        if len(self.calls) <= self.fail_first:
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            return web.Response(status=self.fail_status, text="receiver is sad", headers=headers)
        return web.Response(status=self.status, text=self.reply)

    def json(self, i: int = -1) -> Any:
        return json.loads(self.calls[i]["body"])

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = _free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()


class SMTPCapture:
    """aiosmtpd handler keeping every accepted message (and whether it was authenticated)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            {
                "from": envelope.mail_from,
                "to": list(envelope.rcpt_tos),
                "message": email.message_from_bytes(envelope.content, policy=email.policy.default),
                "authenticated": session.authenticated,
                "login": session.auth_data,
            }
        )
        return "250 Message accepted for delivery"


def authenticator(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == b"alerts@keel.example"
        and auth_data.password == b"correct horse"
    )
    return AuthResult(success=ok, handled=False, auth_data=auth_data.login if ok else None)


@contextlib.contextmanager
def smtp_server(auth: bool = False) -> Iterator[tuple[SMTPCapture, int]]:
    handler = SMTPCapture()
    port = _free_port()
    kwargs: dict[str, Any] = (
        {"authenticator": authenticator, "auth_require_tls": False} if auth else {}
    )
    controller = Controller(handler, hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


@pytest.fixture
def smtp() -> Iterator[tuple[SMTPCapture, int]]:
    with smtp_server() as s:
        yield s


@pytest.fixture
def smtp_auth() -> Iterator[tuple[SMTPCapture, int]]:
    with smtp_server(auth=True) as s:
        yield s


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


@pytest.fixture
async def receiver2() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'keel.db'}")
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
async def dispatcher_for(store: Engine) -> AsyncIterator[Any]:
    made: list[Dispatcher] = []

    def make(
        channels: dict[str, dict[str, Any]],
        environ: dict[str, str] | None = None,
        attempts: int = 3,
    ) -> Dispatcher:
        settings = AlertsSettings(
            channels={k: ChannelSettings(**{"timeout_s": 0.5, **v}) for k, v in channels.items()},
            delivery_attempts=attempts,
            delivery_backoff_s=0.01,
        )
        d = Dispatcher.from_settings(store, settings, environ or {})
        made.append(d)
        return d

    yield make
    for d in made:
        await d.aclose(5)


# --- messages --------------------------------------------------------------------


def test_values_read_like_a_person_writes_them() -> None:
    cases = [
        (0.123, "ratio", "12.3%"),
        (0.0052, "ratio", "0.52%"),
        (850, "ms", "850 ms"),
        (1250, "ms", "1.25 s"),
        (3 * 2**20, "bytes", "3 MiB"),
        (5.5 * 2**30, "bytes", "5.5 GiB"),
        (12.345, "usd", "$12.35"),
        (0.0042, "usd", "$0.0042"),
        (1234, "count", "1,234"),
        (99.5, "percent", "99.5%"),
        (45, "seconds", "45 s"),
        (5400, "seconds", "1 h 30 min"),
        (3.21, "per_s", "3.21/s"),
        (None, "ms", "no data"),
    ]
    for value, unit, text in cases:
        assert m.format_value(value, unit) == text, (value, unit)


def test_summaries_say_what_how_bad_and_since_when() -> None:
    assert m.summary(note()) == (
        "FIRING · critical · error_rate of model=gpt is 12.3% (above 5%) over the last 5 min"
        " — since 03:12 UTC (7 min ago)"
    )
    resolved = m.summary(note(kind="resolved", value=0.012, since_ms=NOW - 25 * 60_000))
    assert resolved.startswith("RESOLVED · critical · error_rate of model=gpt is back to 1.2%")
    assert "lasted 25 min" in resolved
    assert m.summary(note(kind="renotify")).startswith("STILL FIRING · critical")
    change = note(
        signal="latency_p95", mode="change", value=62.0, threshold=50.0, compare_to_s=86400
    )
    assert "latency_p95 of model=gpt is +62% vs the same 5 min a day earlier (above +50%)" in (
        m.summary(change)
    )
    rate = note(mode="rate", value=0.021, threshold=0.01)
    assert "+2.1% per minute" in m.summary(rate)
    assert "above +1% per minute" in m.summary(rate)
    text = m.details(note())
    for piece in ("How bad:", "2.5x the limit of 5%", "Since:", "Runbook:", "Traces:"):
        assert piece in text
    subject = m.group_subject(group_of_three())
    assert subject.startswith("[Keel] 2 alerts firing, 1 resolved: high-error-rate (model=")


# --- Slack -------------------------------------------------------------------------


async def test_slack_block_kit_message(receiver: Receiver, dispatcher_for: Any) -> None:
    d = dispatcher_for({"ops": {"kind": "slack", "url": receiver.url + "/hook"}})
    rec = await d.deliver("ops", [note()])
    assert (rec.status, rec.attempts, rec.error) == ("sent", 1, None)
    assert len(receiver.calls) == 1
    msg = receiver.json()
    blocks = msg["blocks"]
    assert blocks[0]["type"] == "header"
    assert blocks[0]["text"]["text"].startswith("🔴 FIRING [critical] high-error-rate")
    section = blocks[1]
    fields = {f["text"].split("\n", 1)[0]: f["text"].split("\n", 1)[1] for f in section["fields"]}
    assert fields["*Metric*"] == "error_rate"
    assert fields["*Value*"] == "12.3%"
    assert fields["*Threshold*"] == "above 5%"
    assert fields["*Since*"] == "03:12 UTC (7 min ago)"
    assert fields["*Labels*"] == "model=gpt"
    assert fields["*Severity*"] == "critical"
    context = next(b for b in blocks if b["type"] == "context")
    assert "Check the provider status page" in context["elements"][0]["text"]
    buttons = next(b for b in blocks if b["type"] == "actions")["elements"]
    urls = [b["url"] for b in buttons]
    assert urls[0] == "http://keel.example/alerts?rule=high-error-rate"
    assert "http://keel.example/api/traces?model=gpt&status=error" in urls
    assert "https://runbooks.example/error-rate" in urls
    assert "12.3% (above 5%)" in msg["text"] and "since 03:12 UTC" in msg["text"]
    assert len(blocks) <= 50


async def test_slack_url_from_env_never_leaks(receiver: Receiver, dispatcher_for: Any) -> None:
    receiver.status, receiver.reply = 404, "no_service"
    secret_url = receiver.url + "/services/T000/B000/XXXXsecretXXXX"
    d = dispatcher_for(
        {"ops": {"kind": "slack", "url_env": "SLACK_URL"}}, environ={"SLACK_URL": secret_url}
    )
    rec = await d.deliver("ops", [note()])
    assert (rec.status, rec.attempts) == ("failed", 1)  # 404 is permanent
    assert receiver.calls[0]["path"] == "/services/T000/B000/XXXXsecretXXXX"
    assert "answered HTTP 404: no_service" in rec.error
    assert "XXXXsecretXXXX" not in rec.error


async def test_slack_caps_blocks_for_big_groups(receiver: Receiver, dispatcher_for: Any) -> None:
    d = dispatcher_for({"ops": {"kind": "slack", "url": receiver.url}})
    many = [note(labels={"model": f"m{i:02d}"}) for i in range(30)]
    assert (await d.deliver("ops", many)).status == "sent"
    blocks = receiver.json()["blocks"]
    assert len(blocks) <= 50
    assert "…and 20 more" in blocks[-1]["elements"][0]["text"]


# --- webhook -----------------------------------------------------------------------


async def test_webhook_json_and_hmac_signature(receiver: Receiver, dispatcher_for: Any) -> None:
    d = dispatcher_for(
        {
            "hook": {
                "kind": "webhook",
                "url": receiver.url + "/keel",
                "secret_env": "HOOK_SECRET",
                "headers": {"X-Team": "ml", "Authorization": "Bearer ${HOOK_TOKEN}"},
            }
        },
        environ={"HOOK_SECRET": "s3cr3t-key", "HOOK_TOKEN": "tok-123"},
    )
    rec = await d.deliver("hook", [note()])
    assert rec.status == "sent"
    call = receiver.calls[0]
    raw, headers = call["body"], call["headers"]
    expected = "sha256=" + hmac.new(b"s3cr3t-key", raw, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Keel-Signature"], expected)
    assert headers["X-Team"] == "ml"
    assert headers["Authorization"] == "Bearer tok-123"
    assert headers["Content-Type"] == "application/json"
    body = json.loads(raw)
    assert int(headers["X-Keel-Timestamp"]) == body["sent_at"]
    assert abs(body["sent_at"] - time.time()) < 60
    assert body["version"] == 1 and body["status"] == "firing"
    assert body["group_subject"].startswith("[Keel] FIRING [critical] high-error-rate")
    (alert,) = body["alerts"]
    assert alert["rule"] == "high-error-rate" and alert["kind"] == "firing"
    assert alert["labels"] == {"model": "gpt"}
    assert (alert["value"], alert["threshold"], alert["op"]) == (0.123, 0.05, "above")
    assert (alert["mode"], alert["window_s"], alert["severity"]) == ("value", 300.0, "critical")
    assert alert["since"].startswith("2026-01-01T03:12:00")
    assert alert["summary"] == m.summary(note())
    assert alert["runbook_url"] == "https://runbooks.example/error-rate"
    assert alert["links"]["traces"].endswith("status=error")


async def test_webhook_signature_fails_on_tampering(
    receiver: Receiver, dispatcher_for: Any
) -> None:
    d = dispatcher_for(
        {"hook": {"kind": "webhook", "url": receiver.url, "secret_env": "K"}}, environ={"K": "k1"}
    )
    await d.deliver("hook", [note()])
    raw = receiver.calls[0]["body"]
    tampered = raw.replace(b"12.3%", b"1.2%")
    sig = receiver.calls[0]["headers"]["X-Keel-Signature"]
    assert sig != "sha256=" + hmac.new(b"k1", tampered, hashlib.sha256).hexdigest()


# --- PagerDuty ---------------------------------------------------------------------


async def test_pagerduty_trigger_then_resolve(receiver: Receiver, dispatcher_for: Any) -> None:
    receiver.status, receiver.reply = 202, '{"status":"success"}'
    d = dispatcher_for(
        {"pd": {"kind": "pagerduty", "url": receiver.url + "/v2/enqueue", "routing_key_env": "PD"}},
        environ={"PD": "R0UTINGKEY0123456789"},
    )
    assert (await d.deliver("pd", [note()])).status == "sent"
    resolved = note(kind="resolved", value=0.01, ts_ms=NOW + 20 * 60_000, since_ms=NOW)
    assert (await d.deliver("pd", [resolved])).status == "sent"
    trigger, resolve = receiver.json(0), receiver.json(1)
    assert receiver.calls[0]["path"] == "/v2/enqueue"
    assert trigger["routing_key"] == resolve["routing_key"] == "R0UTINGKEY0123456789"
    assert trigger["event_action"] == "trigger" and resolve["event_action"] == "resolve"
    assert trigger["dedup_key"] == resolve["dedup_key"] == "keel:high-error-rate:model=gpt"
    p = trigger["payload"]
    assert p["severity"] == "critical" and p["source"] == "keel"
    assert p["summary"] == m.summary(note())
    assert datetime.fromisoformat(p["timestamp"]).timestamp() * 1000 == NOW
    assert p["custom_details"]["how_bad"].startswith("12.3%")
    assert p["custom_details"]["labels"] == {"model": "gpt"}
    assert {"href": "https://runbooks.example/error-rate", "text": "Runbook"} in trigger["links"]
    assert trigger["client_url"] == "http://keel.example/alerts?rule=high-error-rate"
    warn = note(severity="warning")
    await d.deliver("pd", [warn, note(severity="info", rule="x")])
    assert {receiver.json(2)["payload"]["severity"], receiver.json(3)["payload"]["severity"]} == {
        "warning",
        "info",
    }


# --- e-mail ------------------------------------------------------------------------


async def test_email_plain_smtp(smtp: tuple[SMTPCapture, int], dispatcher_for: Any) -> None:
    handler, port = smtp
    d = dispatcher_for(
        {
            "mail": {
                "kind": "email",
                "smtp_host": "127.0.0.1",
                "smtp_port": port,
                "starttls": False,
                "sender": "keel@keel.example",
                "to": ["oncall@example.com", "ml@example.com"],
            }
        }
    )
    rec = await d.deliver("mail", [note()])
    assert (rec.status, rec.attempts) == ("sent", 1), rec.error
    (got,) = handler.messages
    assert got["from"] == "keel@keel.example"
    assert got["to"] == ["oncall@example.com", "ml@example.com"]
    msg = got["message"]
    assert msg["Subject"] == (
        "[Keel] FIRING [critical] high-error-rate (model=gpt): error_rate 12.3% (above 5%)"
    )
    assert msg["To"] == "oncall@example.com, ml@example.com"
    text = msg.get_body(("plain",)).get_content()
    for piece in (
        "high-error-rate",
        "12.3%",
        "above 5%",
        "03:12 UTC (7 min ago)",
        "https://runbooks.example/error-rate",
        "Check the provider status page",
    ):
        assert piece in text, piece
    page = msg.get_body(("html",)).get_content()
    assert "high-error-rate" in page and "12.3%" in page
    assert 'href="http://keel.example/api/traces?model=gpt&amp;status=error"' in page


async def test_email_login_with_password_from_env(
    smtp_auth: tuple[SMTPCapture, int], dispatcher_for: Any
) -> None:
    handler, port = smtp_auth
    base = {
        "kind": "email",
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "starttls": False,
        "username": "alerts@keel.example",
        "password_env": "SMTP_PASSWORD",
        "sender": "keel@keel.example",
        "to": ["oncall@example.com"],
    }
    d = dispatcher_for({"good": base}, environ={"SMTP_PASSWORD": "correct horse"})
    rec = await d.deliver("good", [note()])
    assert rec.status == "sent", rec.error
    assert handler.messages[0]["authenticated"] is True
    assert handler.messages[0]["login"] == b"alerts@keel.example"

    d2 = dispatcher_for({"bad": base}, environ={"SMTP_PASSWORD": "wrong battery"})
    rec = await d2.deliver("bad", [note()])
    assert (rec.status, rec.attempts) == ("failed", 1)  # a refused login is not retried
    assert "refused the login of alerts@keel.example" in rec.error
    assert "wrong battery" not in rec.error

    d3 = dispatcher_for({"unset": base}, environ={})
    rec = await d3.deliver("unset", [note()])
    assert (rec.status, rec.attempts) == ("failed", 1)
    assert "SMTP_PASSWORD" in rec.error
    assert len(handler.messages) == 1


async def test_email_starttls_required_but_not_offered(
    smtp: tuple[SMTPCapture, int], dispatcher_for: Any
) -> None:
    handler, port = smtp
    d = dispatcher_for(
        {
            "mail": {
                "kind": "email",
                "smtp_host": "127.0.0.1",
                "smtp_port": port,
                "starttls": True,
                "sender": "keel@keel.example",
                "to": ["oncall@example.com"],
            }
        }
    )
    rec = await d.deliver("mail", [note()])
    assert (rec.status, rec.attempts) == ("failed", 1)
    assert "STARTTLS" in rec.error
    assert handler.messages == []


# --- grouping, retries, isolation --------------------------------------------------


async def test_one_message_per_channel_for_a_group(
    receiver: Receiver,
    receiver2: Receiver,
    smtp: tuple[SMTPCapture, int],
    dispatcher_for: Any,
    store: Engine,
) -> None:
    handler, port = smtp
    pd = await Receiver().start()
    try:
        d = dispatcher_for(
            {
                "slack": {"kind": "slack", "url": receiver.url},
                "hook": {"kind": "webhook", "url": receiver2.url},
                "pd": {"kind": "pagerduty", "url": pd.url, "routing_key_env": "PD"},
                "mail": {
                    "kind": "email",
                    "smtp_host": "127.0.0.1",
                    "smtp_port": port,
                    "starttls": False,
                    "sender": "keel@keel.example",
                    "to": ["oncall@example.com"],
                },
            },
            environ={"PD": "rk"},
        )
        group = group_of_three()
        tasks = d.dispatch({name: group for name in ("slack", "hook", "pd", "mail")})
        assert len(tasks) == 4
        await d.drain(5)
        assert len(receiver.calls) == 1
        sections = [b for b in receiver.json()["blocks"] if b["type"] == "section"]
        assert len(sections) == 3
        assert "2 alerts firing, 1 resolved" in receiver.json()["blocks"][0]["text"]["text"]
        assert len(receiver2.calls) == 1
        body = receiver2.json()
        assert body["status"] == "mixed" and len(body["alerts"]) == 3
        assert [a["kind"] for a in body["alerts"]] == ["firing", "firing", "resolved"]
        assert len(handler.messages) == 1
        msg = handler.messages[0]["message"]
        assert msg["Subject"].startswith("[Keel] 2 alerts firing, 1 resolved: high-error-rate")
        text = msg.get_body(("plain",)).get_content()
        assert "slow-p95" in text and "lasted 25 min" in text
        assert len(pd.calls) == 3
        actions = sorted(json.loads(c["body"])["event_action"] for c in pd.calls)
        assert actions == ["resolve", "trigger", "trigger"]
    finally:
        await pd.stop()
    rows = recent(store)
    assert sorted(r["channel"] for r in rows) == ["hook", "mail", "pd", "slack"]
    assert all(r["status"] == "sent" and r["attempts"] == 1 for r in rows)
    assert len(rows[0]["alerts"]) == 3
    assert {"rule": "slow-p95", "labels": {}, "kind": "resolved"} in rows[0]["alerts"]


@pytest.mark.parametrize("status", [500, 429])
async def test_retries_until_it_works(
    status: int, receiver: Receiver, dispatcher_for: Any, store: Engine
) -> None:
    receiver.fail_first, receiver.fail_status, receiver.retry_after = 2, status, "0"
    d = dispatcher_for({"hook": {"kind": "webhook", "url": receiver.url}}, attempts=4)
    rec = await d.deliver("hook", [note()])
    assert (rec.status, rec.attempts, rec.error) == ("sent", 3, None)
    assert len(receiver.calls) == 3
    (row,) = recent(store)
    assert (row["status"], row["attempts"], row["kind"]) == ("sent", 3, "webhook")


async def test_gives_up_after_the_last_attempt(receiver: Receiver, dispatcher_for: Any) -> None:
    receiver.fail_first = 99
    d = dispatcher_for({"hook": {"kind": "webhook", "url": receiver.url}}, attempts=3)
    rec = await d.deliver("hook", [note()])
    assert (rec.status, rec.attempts) == ("failed", 3)
    assert "answered HTTP 500: receiver is sad" in rec.error
    assert len(receiver.calls) == 3


async def test_permanent_4xx_is_not_retried(
    receiver: Receiver, dispatcher_for: Any, store: Engine
) -> None:
    receiver.status, receiver.reply = 400, "invalid_payload"
    d = dispatcher_for({"ops": {"kind": "slack", "url": receiver.url}})
    rec = await d.deliver("ops", [note()])
    assert (rec.status, rec.attempts) == ("failed", 1)
    assert len(receiver.calls) == 1
    (row,) = recent(store, channel="ops")
    assert row["status"] == "failed" and "HTTP 400: invalid_payload" in row["error"]
    assert row["alerts"] == [
        {"rule": "high-error-rate", "labels": {"model": "gpt"}, "kind": "firing"}
    ]


async def test_missing_env_var_fails_without_retry(
    receiver: Receiver, dispatcher_for: Any, store: Engine
) -> None:
    d = dispatcher_for(
        {"hook": {"kind": "webhook", "url": receiver.url, "secret_env": "HOOK_SIGNING_KEY"}}
    )
    assert d.notifiers["hook"].check() == [
        "channel 'hook': environment variable HOOK_SIGNING_KEY (signing secret) is not set"
    ]
    rec = await d.deliver("hook", [note()])
    assert (rec.status, rec.attempts) == ("failed", 1)
    assert "HOOK_SIGNING_KEY" in rec.error
    assert receiver.calls == []
    assert recent(store)[0]["error"] == rec.error


async def test_hanging_channel_does_not_block_others(
    receiver: Receiver, receiver2: Receiver, dispatcher_for: Any, store: Engine
) -> None:
    receiver.hang = True
    d = dispatcher_for(
        {
            "slow": {"kind": "webhook", "url": receiver.url},
            "fast": {"kind": "webhook", "url": receiver2.url},
        },
        attempts=2,
    )
    t0 = time.monotonic()
    slow_task, fast_task = d.dispatch({"slow": [note()], "fast": [note()]})
    # the caller (the evaluator) never waits: both deliveries are still running
    assert not slow_task.done() and not fast_task.done()
    fast = await fast_task
    fast_done = time.monotonic() - t0
    assert fast.status == "sent"
    assert not slow_task.done()
    assert [r["channel"] for r in recent(store)] == ["fast"]
    slow = await slow_task
    slow_done = time.monotonic() - t0
    assert (slow.status, slow.attempts) == ("failed", 2)
    assert "0.5 s" in slow.error
    assert slow_done >= 1.0 and fast_done < slow_done, (fast_done, slow_done)
    assert len(receiver.calls) == 2


async def test_drain_cancels_and_records_what_is_still_running(
    receiver: Receiver, dispatcher_for: Any, store: Engine
) -> None:
    receiver.hang = True
    d = dispatcher_for({"slow": {"kind": "webhook", "url": receiver.url, "timeout_s": 30}})
    d.dispatch({"slow": [note()]})
    await asyncio.sleep(0.1)
    await d.drain(0.2)
    assert d.pending == 0
    (row,) = recent(store)
    assert row["status"] == "failed" and "cancelled" in row["error"]


class BrokenNotifier(Notifier):
    kind = "broken"

    async def send(self, notifications: list[Notification]) -> None:
        raise RuntimeError("boom: a bug in a notifier")


async def test_a_buggy_notifier_is_recorded_not_raised(store: Engine) -> None:
    settings = ChannelSettings(kind="webhook", url="http://127.0.0.1:9/")
    session = SharedSession()
    d = Dispatcher(
        store,
        {"bug": BrokenNotifier("bug", settings, {}, session)},
        attempts=3,
        backoff_s=0.01,
        session=session,
    )
    rec = await d.deliver("bug", [note()])
    assert (rec.status, rec.attempts, rec.kind) == ("failed", 1, "broken")
    assert "RuntimeError: boom: a bug in a notifier" in rec.error
    (task,) = d.dispatch({"bug": [note()]})
    await d.drain(5)
    assert task.result().status == "failed"
    unknown = await d.deliver("nowhere", [note()])
    assert unknown.status == "failed" and "unknown channel 'nowhere'" in unknown.error
    assert [r["status"] for r in recent(store)] == ["failed"] * 3
    await d.aclose()


async def test_send_test_is_labelled_a_test_everywhere(
    receiver: Receiver,
    receiver2: Receiver,
    smtp: tuple[SMTPCapture, int],
    dispatcher_for: Any,
    store: Engine,
) -> None:
    handler, port = smtp
    d = dispatcher_for(
        {
            "slack": {"kind": "slack", "url": receiver.url},
            "hook": {"kind": "webhook", "url": receiver2.url},
            "mail": {
                "kind": "email",
                "smtp_host": "127.0.0.1",
                "smtp_port": port,
                "starttls": False,
                "sender": "keel@keel.example",
                "to": ["oncall@example.com"],
            },
        }
    )
    for ch in ("slack", "hook", "mail"):
        rec = await d.send_test(ch)
        assert rec.status == "sent", (ch, rec.error)
        assert rec.alerts == [{"rule": "keel-test", "labels": {"channel": ch}, "kind": "test"}]
    slack = receiver.json()
    assert slack["blocks"][0]["text"]["text"].startswith("🧪 TEST keel-test")
    assert "nothing is wrong" in slack["text"]
    hook = receiver2.json()
    assert hook["status"] == "test" and hook["alerts"][0]["test"] is True
    assert hook["alerts"][0]["rule"] == "keel-test"
    msg = handler.messages[0]["message"]
    assert msg["Subject"].startswith("[Keel] TEST keel-test")
    assert "nothing is wrong" in msg.get_body(("plain",)).get_content()
    assert [r["channel"] for r in recent(store, limit=2)] == ["mail", "hook"]
