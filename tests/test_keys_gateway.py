"""Virtual keys on the gateway path: attribution per key and the models a key may use."""

from __future__ import annotations

import httpx


def test_key_attribution_and_allowed_models(keel_factory):
    keel = keel_factory(auth={"enabled": "on"})
    rec, secret = keel.state.keystore.create("checkout-app", models=["gpt"])
    auth = {"Authorization": f"Bearer {secret}"}
    body = {"messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(keel.url + "/v1/chat/completions", headers=auth, json={**body, "model": "gpt"})
    assert r.status_code == 200
    (t,) = keel.rows()
    assert t["api_key_id"] == rec.id
    r = httpx.post(
        keel.url + "/v1/chat/completions", headers=auth, json={**body, "model": "claude"}
    )
    assert r.status_code == 403
    assert "may not use model 'claude' (allowed: gpt)" in r.json()["error"]["message"]
    r = httpx.post(keel.url + "/v1/chat/completions", json={**body, "model": "gpt"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert len(keel.rows()) == 1  # refused calls leave no trace


def test_cli_sends_keel_api_key(keel_factory, monkeypatch):
    from click.testing import CliRunner

    from keel.cli import cli

    keel = keel_factory(auth={"enabled": "on"})
    _, read_key = keel.state.keystore.create("dash", role="read")
    res = CliRunner().invoke(cli, ["traces", "list", "--url", keel.url])
    assert res.exit_code == 1 and "key" in res.output.lower(), res.output
    monkeypatch.setenv("KEEL_API_KEY", read_key)
    res = CliRunner().invoke(cli, ["traces", "list", "--url", keel.url])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["stats", "--url", keel.url])
    assert res.exit_code == 0, res.output
