"""Three real `keel up` processes sharing PostgreSQL and Redis: limits hold in total.

Each replica is a separate process with its own event loop and memory; only
the machine's PostgreSQL (store, keys) and Redis (counters, budgets,
revocations) are shared. Calls are spread over the replicas and fired
concurrently; the limits must hold for the sum, and every admitted call must be
in the store exactly once.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from keel.cli import cli
from keel.testing.fake_upstream import _free_port

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def _config(tmp_path, fake, pg_url: str, prefix: str) -> str:
    cfg = tmp_path / "keel.yaml"
    cfg.write_text(f"""
database_url: "{pg_url}"
redis_url: "redis://127.0.0.1:6379/0"
local: {{enabled: false}}
auth: {{enabled: "on"}}
recorder: {{flush_interval_s: 0.05}}
providers:
  fake: {{kind: openai, base_url: "{fake.url}"}}
models:
  gpt: fake/fake
prices:
  - {{provider: fake, model: fake, per_request: 0.01}}
monitoring: {{probe_interval_s: 3600, sample_interval_s: 3600}}
""")
    return str(cfg)


@pytest.fixture
def replicas(tmp_path, fake, pg_url):
    cfg = _config(tmp_path, fake, pg_url, uuid.uuid4().hex[:6])
    env = {**os.environ, "KEEL_ADMIN_KEY": "sk-keel-admin-for-the-test-000000000000000"}
    procs, urls = [], []
    for i in range(3):
        port = _free_port()
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "keel.cli",
                    "up",
                    "--config",
                    cfg,
                    "--port",
                    str(port),
                    "--data-dir",
                    str(tmp_path / f"replica{i}"),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        urls.append(f"http://127.0.0.1:{port}")
    deadline = time.time() + 60
    for url in urls:
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "replicas did not start"
            time.sleep(0.1)
    try:
        yield cfg, urls
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait(30)


def _create_key(cfg: str, *args: str) -> str:
    res = CliRunner().invoke(cli, ["keys", "create", "--config", cfg, *args])
    assert res.exit_code == 0, res.output
    return next(w for w in res.output.split() if w.startswith("sk-keel-"))


def _call(url: str, key: str, i: int) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        timeout=20,
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "gpt", "messages": [{"role": "user", "content": f"c{i}"}]},
    )


def _wait_for_minute_room(seconds: float = 15) -> None:
    # The RPM windows are UTC minutes: start where the whole burst fits in one.
    left = 60 - time.time() % 60
    if left < seconds:
        time.sleep(left + 0.5)


def test_three_replicas_share_limits_budgets_and_revocations(replicas, pg_url):
    cfg, urls = replicas
    engine = sa.create_engine(pg_url)

    # RPM across replicas: 60 concurrent calls spread over 3 processes, 20 allowed.
    rpm_key = _create_key(cfg, "--name", "burst", "--rpm", "20")
    _wait_for_minute_room()
    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        results = list(pool.map(lambda i: _call(urls[i % 3], rpm_key, i), range(60)))
    codes = [r.status_code for r in results]
    assert codes.count(200) == 20 and codes.count(429) == 40, codes
    served_by = {urls[i % 3] for i, r in enumerate(results) if r.status_code == 200}
    assert len(served_by) == 3  # each replica admitted some: the limit is shared, not local

    # Budget across replicas: $0.05 at $0.01 a call → 5 calls in total.
    budget_key = _create_key(cfg, "--name", "budgeted", "--budget-usd", "0.05/month")
    codes = []
    for i in range(9):
        codes.append(_call(urls[i % 3], budget_key, i).status_code)
        time.sleep(0.15)  # let the replica settle the spend in Redis
    assert codes == [200] * 5 + [429] * 4, codes

    # Every admitted call is in the shared store exactly once.
    ok_ids = [r.headers["x-keel-trace-id"] for r in results if r.status_code == 200]
    deadline = time.time() + 20
    while time.time() < deadline:
        with engine.connect() as c:
            n = c.execute(sa.text("SELECT COUNT(*) FROM traces")).scalar()
        if n >= 25:
            break
        time.sleep(0.2)
    with engine.connect() as c:
        ids = [r[0] for r in c.execute(sa.text("SELECT id FROM traces"))]
        spent = c.execute(
            sa.text(
                "SELECT SUM(cost_usd) FROM traces t JOIN api_keys k "
                "ON t.api_key_id = k.id WHERE k.name = 'budgeted'"
            )
        ).scalar()
    assert len(ids) == 25 == len(set(ids)) and set(ok_ids) <= set(ids)
    assert spent == pytest.approx(0.05)

    # Revocation on one machine (the CLI) reaches every replica at once.
    live_key = _create_key(cfg, "--name", "to-revoke")
    assert all(_call(u, live_key, 0).status_code == 200 for u in urls)  # cached everywhere
    prefix = live_key[:12]
    res = CliRunner().invoke(cli, ["keys", "revoke", prefix, "--config", cfg])
    assert res.exit_code == 0, res.output
    time.sleep(0.5)
    assert [_call(u, live_key, 1).status_code for u in urls] == [401, 401, 401]
    engine.dispose()
