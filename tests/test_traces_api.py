"""/api/traces: filters, cursor pagination, detail; and the `keel traces` CLI."""

from __future__ import annotations

import time

import httpx
from click.testing import CliRunner

from keel.cli import cli


def _send(keel, n, **headers):
    for i in range(n):
        r = httpx.post(
            keel.url + "/v1/chat/completions",
            headers=headers,
            json={"model": "gpt", "messages": [{"role": "user", "content": f"m{i}"}]},
        )
        assert r.status_code == 200


def test_filters_pagination_and_detail(keel):
    _send(keel, 7, **{"X-Keel-User": "u1", "X-Keel-Feature": "f1"})
    _send(keel, 3, **{"X-Keel-User": "u2"})
    httpx.post(
        keel.url + "/v1/chat/completions",
        json={"model": "claude", "messages": [{"role": "user", "content": "[[fake: error=500]]"}]},
    )
    keel.flush()
    api = keel.url + "/api/traces"
    assert len(httpx.get(api, params={"limit": 100}).json()["data"]) == 11
    assert len(httpx.get(api, params={"user": "u1"}).json()["data"]) == 7
    assert len(httpx.get(api, params={"feature": "f1", "user": "u2"}).json()["data"]) == 0
    errs = httpx.get(api, params={"status": "error"}).json()["data"]
    assert len(errs) == 1 and errs[0]["model"] == "claude"
    assert len(httpx.get(api, params={"model": "claude"}).json()["data"]) == 1

    # cursor pagination walks everything exactly once, newest first
    seen, cursor = [], None
    while True:
        page = httpx.get(api, params={"limit": 4, **({"cursor": cursor} if cursor else {})}).json()
        seen += [t["id"] for t in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == 11 == len(set(seen))
    starts = [t["started_at"] for t in httpx.get(api, params={"limit": 11}).json()["data"]]
    assert starts == sorted(starts, reverse=True)

    # time range
    assert len(httpx.get(api, params={"since": "1h"}).json()["data"]) == 11
    future = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    assert httpx.get(api, params={"since": future}).json()["data"] == []
    assert len(httpx.get(api, params={"until": future, "limit": 50}).json()["data"]) == 11

    detail = httpx.get(f"{api}/{seen[0]}").json()
    assert detail["request"]["model"] == "claude" or detail["request"]["messages"]
    assert detail["id"] == seen[0]


def test_bad_filters_are_400_and_missing_trace_404(keel):
    api = keel.url + "/api/traces"
    for params, needle in [
        ({"since": "yesterday"}, "since"),
        ({"limit": 0}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"status": "weird"}, "status"),
        ({"cursor": "!!!"}, "cursor"),
    ]:
        r = httpx.get(api, params=params)
        assert r.status_code == 400, (params, r.text)
        assert needle in r.json()["error"]["message"]
    r = httpx.get(api + "/does-not-exist")
    assert r.status_code == 404 and "does-not-exist" in r.json()["error"]["message"]


def test_cli_traces_list_and_show(keel):
    _send(keel, 2, **{"X-Keel-User": "carol"})
    keel.flush()
    runner = CliRunner()
    res = runner.invoke(cli, ["traces", "list", "--url", keel.url])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0].startswith("ID") and len(lines) == 3 and "carol" in lines[1]
    tid = lines[1].split()[0]
    res = runner.invoke(cli, ["traces", "show", tid, "--url", keel.url])
    assert res.exit_code == 0 and f'"id": "{tid}"' in res.output
    res = runner.invoke(cli, ["traces", "show", "nope", "--url", keel.url])
    assert res.exit_code == 1 and "no trace with id 'nope'" in res.output
    res = runner.invoke(cli, ["traces", "list", "--url", "http://127.0.0.1:9"])
    assert res.exit_code == 1 and "is `keel up` running?" in res.output
