"""A real Prometheus server scrapes Keel's /metrics; the shipped dashboard uses real metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from keel.testing.fake_upstream import _free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_real_prometheus_scrapes_keel(keel, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("the Debian package `prometheus` must be installed in CI (.ci/run)")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    for _ in range(4):
        httpx.post(
            keel.url + "/v1/chat/completions",
            json={"model": "gpt", "messages": [{"role": "user", "content": "hi"}]},
        )
    keel.flush()
    port = _free_port()
    cfg = tmp_path / "prometheus.yml"
    # The shipped scrape config, pointed at this test's Keel and scraped every second.
    text = (ROOT / "deploy" / "prometheus.yml").read_text()
    text = text.replace("127.0.0.1:4000", f"127.0.0.1:{keel.port}").replace("15s", "1s")
    cfg.write_text(text)
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 40
        value = None
        while time.time() < deadline:
            try:
                r = httpx.get(
                    f"http://127.0.0.1:{port}/api/v1/query",
                    params={"query": 'sum(keel_requests_total{model="gpt"})'},
                )
                result = r.json()["data"]["result"]
                if result:
                    value = float(result[0]["value"][1])
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert value == 4.0
        targets = httpx.get(f"http://127.0.0.1:{port}/api/v1/targets").json()
        (target,) = targets["data"]["activeTargets"]
        assert target["health"] == "up", target
        r = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/query",
            params={
                "query": "histogram_quantile(0.5, sum by (le) "
                "(keel_request_duration_seconds_bucket))"
            },
        )
        assert r.json()["data"]["result"], "histogram buckets are queryable"
    finally:
        proc.terminate()
        proc.wait(10)


def test_dashboard_only_uses_metrics_keel_exports(keel):
    dash = json.loads((ROOT / "deploy" / "grafana" / "keel-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(bucket|total|count|sum)$", "", m)
        for e in exprs
        for m in re.findall(r"keel_[a-z_]+", e)
    }
    httpx.post(
        keel.url + "/v1/chat/completions",
        json={"model": "gpt", "messages": [{"role": "user", "content": "hi"}]},
    )
    keel.flush()
    exported = {
        f.name for f in text_string_to_metric_families(httpx.get(keel.url + "/metrics").text)
    }
    missing = used - exported
    assert not missing, f"dashboard queries metrics Keel does not export: {sorted(missing)}"
