"""`keel up` as a user runs it: a separate process, a keel.yaml, the openai SDK."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from keel.testing.fake_upstream import _free_port


@pytest.mark.slow
def test_keel_up_process_serves_and_records(fake, tmp_path):
    port = _free_port()
    cfg = tmp_path / "keel.yaml"
    cfg.write_text(f"""
local: {{enabled: false}}
providers:
  up: {{kind: openai, base_url: "{fake.url}", api_key_env: UP_KEY}}
models:
  chat: up/fake
""")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keel.cli",
            "up",
            "--port",
            str(port),
            "--config",
            str(cfg),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        env={**os.environ, "UP_KEY": "sk-from-env"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        r = client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}]
        )
        assert r.choices[0].message.content == "Echo: hi"
        assert fake.headers[-1]["authorization"] == "Bearer sk-from-env"
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "a b"}], stream=True
            )
            if c.choices
        )
        assert text == "Echo: a b"
        deadline = time.time() + 10
        while time.time() < deadline:
            page = httpx.get(url + "/api/traces").json()
            if len(page["data"]) == 2:
                break
            time.sleep(0.1)
        assert [t["model"] for t in page["data"]] == ["chat", "chat"]
        assert "/v1/chat/completions" in httpx.get(url + "/openapi.json").json()["paths"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"keel 0.1.0 on http://127.0.0.1:{port}" in out
    assert "Traceback" not in out
    # a graceful stop leaves nothing in the spill directory
    assert not list((tmp_path / "data" / "spill").glob("*.jsonl"))


def test_keel_up_refuses_a_bad_config(tmp_path):
    cfg = tmp_path / "keel.yaml"
    cfg.write_text("port: seventy\n")
    res = subprocess.run(
        [sys.executable, "-m", "keel.cli", "up", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 1
    assert "port: Input should be a valid integer" in res.stderr
    assert "Traceback" not in res.stderr
