"""Tracked runs: a real training subprocess, a real Keel with keys on, the real store."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

import keel
from keel.data.versions import DatasetStore
from keel.errors import Conflict, InvalidRequest, KeelError, NotFound
from keel.runs._client import KeelUnreachable
from keel.runs.artifacts import check_path
from keel.runs.cli import runs as runs_cli
from keel.runs.store import downsample
from keel.testing.fake_upstream import _free_port

ROLES = ("user", "read", "approver", "admin")


class Env:
    """A Keel with auth on and one key per role."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.url = server.url
        ks = server.state.keystore
        self.keys = {role: ks.create(f"{role}-key", role=role)[1] for role in ROLES}
        self.root = Path(server.settings.artifact_root)

    def req(self, method: str, path: str, role: str = "read", **kw: Any) -> httpx.Response:
        h = {"Authorization": f"Bearer {self.keys[role]}"}
        return httpx.request(method, self.url + path, headers=h, timeout=30, **kw)

    def get(self, path: str, **kw: Any) -> Any:
        r = self.req("GET", path, **kw)
        assert r.status_code == 200, r.text
        return r.json()

    def audit(self) -> list[dict[str, Any]]:
        return self.server.rows("audit_log")

    def run(self, name: str | None = None, **kw: Any) -> keel.runs.Run:
        kw.setdefault("system_interval_s", 0.05)
        kw.setdefault("flush_interval_s", 0.05)
        return keel.run(name, url=self.url, api_key=self.keys["user"], **kw)


@pytest.fixture
def env(keel_factory: Any) -> Env:
    return Env(keel_factory(auth={"enabled": "on"}))


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _script_env(env: Env, **extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    return {**e, "KEEL_URL": env.url, "KEEL_API_KEY": env.keys["user"], **extra}


TRAIN = textwrap.dedent(
    """
    import pathlib, sys, time
    import keel

    out = pathlib.Path("out/adapter")
    out.mkdir(parents=True, exist_ok=True)
    (out / "weights.bin").write_bytes(bytes(range(256)) * 40)
    (out / "sub").mkdir(exist_ok=True)
    (out / "sub" / "config.json").write_text('{"r": 8}')
    with keel.run("train-small", params={"lr": 0.001, "epochs": 2},
                  system_interval_s=0.05, flush_interval_s=0.05) as run:
        run.log_dataset("chats")
        for step in range(20):
            run.log_metric("loss", 1.0 / (step + 1), step=step)
            run.log_metric("acc", step / 20)  # no step: 0, 1, 2, …
            time.sleep(0.01)
        run.log_artifact(out)
        run.log_artifact("train.py", name="code/train.py")
    print("RUN", run.id)
    """
)


def test_training_script_is_tracked(env: Env, tmp_path: Path) -> None:
    store = DatasetStore(env.server.state.engine, env.server.settings.artifact_root)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
        for i in range(3)
    ]
    ds = store.write_version("chats", "chat", iter(rows))
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.py").write_text(TRAIN)
    _git(repo, "init", "-q")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "add", "train.py")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "train")
    commit = _git(repo, "rev-parse", "HEAD")
    (repo / "train.py").write_text(TRAIN + "\n# local change\n")  # dirty the checkout
    p = subprocess.run(
        [sys.executable, "train.py"],
        cwd=repo,
        env=_script_env(env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    run_id = p.stdout.split("RUN ", 1)[1].strip()

    r = env.get(f"/api/runs/{run_id}")
    assert r["name"] == "train-small" and r["status"] == "finished"
    assert r["duration_ms"] > 0 and r["ended_at_ms"] >= r["started_at_ms"]
    assert r["params"] == {"lr": 0.001, "epochs": 2}
    assert r["code"]["commit"] == commit and r["code"]["dirty"] is True
    pkgs = r["environment"]["packages"]
    assert any(p.startswith("httpx==") for p in pkgs) and len(pkgs) > 10
    assert r["inputs"]["datasets"] == [{"ref": "chats", "name": "chats", "id": ds.id}]
    assert r["created_by"].startswith("user-key")
    assert (
        r["metrics"]["loss"]["value"] == pytest.approx(1 / 20)
        and r["metrics"]["loss"]["step"] == 19
    )
    assert any(k.startswith("system/cpu_percent") for k in r["metrics"])
    assert r["metrics"]["system/memory_rss_mb"]["value"] > 1

    hist = env.get(f"/api/runs/{run_id}/metrics")["data"]
    assert [p["step"] for p in hist["loss"]] == list(range(20))
    assert [p["value"] for p in hist["loss"]] == pytest.approx([1 / (s + 1) for s in range(20)])
    assert [p["step"] for p in hist["acc"]] == list(range(20))
    assert len(hist["system/cpu_percent"]) >= 1
    only = env.get(f"/api/runs/{run_id}/metrics", params={"key": "loss", "max_points": 5})["data"]
    assert list(only) == ["loss"] and [p["step"] for p in only["loss"]] == [0, 5, 10, 14, 19]

    arts = {a["path"]: a for a in r["artifacts"]}
    assert set(arts) == {"adapter/weights.bin", "adapter/sub/config.json", "code/train.py"}
    base = env.root / "runs" / run_id
    weights = (base / "adapter" / "weights.bin").read_bytes()
    assert weights == bytes(range(256)) * 40
    assert arts["adapter/weights.bin"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert (base / "adapter" / "sub" / "config.json").read_text() == '{"r": 8}'
    assert not list(env.root.rglob("*.keel-part"))
    got = env.req("GET", f"/api/runs/{run_id}/artifacts/file", params={"path": "code/train.py"})
    assert got.status_code == 200 and got.content == (repo / "train.py").read_bytes()
    # The run's changes are audited; its metric batches (telemetry) are not.
    deadline = time.monotonic() + 10
    while not any(a["action"] == "PATCH " + f"/api/runs/{run_id}" for a in env.audit()):
        assert time.monotonic() < deadline, env.audit()
        time.sleep(0.05)
    actions = {a["action"] for a in env.audit()}
    assert "POST /api/runs" in actions and f"POST /api/runs/{run_id}/artifacts" in actions
    assert not any(a.endswith("/metrics") for a in actions)


def test_exception_inside_the_block_fails_the_run_and_propagates(env: Env) -> None:
    with pytest.raises(ValueError, match="bad batch"), env.run("boom") as run:
        run.log_metric("loss", 0.5)
        raise ValueError("bad batch")
    r = env.get(f"/api/runs/{run.id}")
    assert r["status"] == "failed" and r["error"].startswith("ValueError: bad batch")
    assert "Traceback" in r["error"] and r["metrics"]["loss"]["value"] == 0.5
    with pytest.raises(KeelError, match="not running"):
        run.log_metric("loss", 0.1)


def test_keel_run_id_attaches_to_a_pipeline_run(env: Env, tmp_path: Path) -> None:
    made = env.req(
        "POST",
        "/api/runs",
        "user",
        json={"name": "pipeline-step", "status": "pending", "pipeline_run_id": "p1"},
    )
    assert made.status_code == 201, made.text
    rid = made.json()["id"]
    script = tmp_path / "step.py"
    script.write_text(
        "import keel\n"
        "with keel.run(params={'seed': 7}, system_metrics=False) as r:\n"
        "    r.log_metric('m', 2.5)\n"
        "print('RUN', r.id)\n"
    )
    e = _script_env(env, KEEL_RUN_ID=rid)
    p = subprocess.run(
        [sys.executable, str(script)],
        env=e,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("RUN ", 1)[1].strip() == rid
    r = env.get(f"/api/runs/{rid}")
    assert (r["name"], r["status"], r["pipeline_run_id"]) == ("pipeline-step", "finished", "p1")
    assert r["params"] == {"seed": 7} and r["metrics"]["m"]["value"] == 2.5
    assert r["code"] is None and r["environment"]["packages"]  # no git in tmp_path
    # A finished run takes no second attempt: the script fails with one clear error.
    p = subprocess.run(
        [sys.executable, str(script)],
        env=e,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert p.returncode != 0 and "already finished" in p.stderr
    assert env.get(f"/api/runs/{rid}")["status"] == "finished"


def test_compare_runs_api_and_cli(env: Env) -> None:
    ids = []
    for lr, scale in ((0.1, 1.0), (0.01, 0.5)):
        with env.run("sweep", params={"lr": lr, "batch": 32}, experiment="exp1") as run:
            for s in range(20):
                run.log_metric("loss", scale / (s + 1), step=s)
        ids.append(run.id)
    c = env.get("/api/runs/compare", params={"ids": ",".join(ids), "curves": "loss"})
    assert [r["id"] for r in c["runs"]] == ids
    assert c["params"] == {"batch": [32, 32], "lr": [0.1, 0.01]}
    assert c["params_differ"] == ["lr"] and "loss" in c["metrics_differ"]
    assert c["metrics"]["loss"] == pytest.approx([1 / 20, 0.5 / 20])
    assert [len(c["curves"]["loss"][i]) for i in ids] == [20, 20]
    assert c["curves"]["loss"][ids[1]][0] == [0, 0.5]

    cli_env = {"KEEL_URL": env.url, "KEEL_API_KEY": env.keys["read"]}
    res = CliRunner().invoke(runs_cli, ["compare", *ids, "--curve", "loss"], env=cli_env)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    lr_line = next(line for line in lines if "param lr" in line)
    assert lr_line.startswith("*") and "0.1" in lr_line and "0.01" in lr_line
    assert not any("param batch" in line for line in lines)  # the same in both: hidden
    assert sum("▁" in line for line in lines) == 2
    res = CliRunner().invoke(runs_cli, ["list", "--experiment", "exp1"], env=cli_env)
    assert res.exit_code == 0 and all(i in res.output for i in ids)
    res = CliRunner().invoke(runs_cli, ["show", ids[0]], env=cli_env)
    assert res.exit_code == 0 and "lr = 0.1" in res.output and "[finished]" in res.output
    res = CliRunner().invoke(runs_cli, ["metrics", ids[0], "--key", "loss"], env=cli_env)
    assert res.exit_code == 0 and "STEP" in res.output and "0.05" in res.output
    res = CliRunner().invoke(runs_cli, ["show", "nope"], env=cli_env)
    assert (
        res.exit_code == 1 and res.output.strip() == "error: no run 'nope' (see `keel runs list`)"
    )
    res = CliRunner().invoke(runs_cli, ["compare", ids[0]], env=cli_env)
    assert res.exit_code == 1 and res.output.startswith("error:")


def test_bad_input_is_refused_and_loses_nothing(keel_factory: Any) -> None:
    env = Env(keel_factory(auth={"enabled": "on"}, registry={"max_artifact_mb": 1}))
    run = env.run("careful", params={"lr": 0.1})
    run.log_metric("loss", 1.0, step=0)
    run.flush()
    base = f"/api/runs/{run.id}"
    with pytest.raises(Conflict, match=r"already 0\.1"):
        run.log_param("lr", 0.2)
    run.log_param("lr", 0.1)  # the same value again is fine
    with pytest.raises(InvalidRequest, match="invalid metric key"):
        run.log_metric("../bad key", 1.0)
    # One bad point rejects the whole batch: nothing of it is stored.
    batch = [{"key": "loss", "value": 0.5, "step": 1}, {"key": "loss", "value": "x", "step": 2}]
    r = env.req("POST", base + "/metrics", "user", json={"metrics": batch})
    assert r.status_code == 400 and "must be a number" in r.json()["error"]["message"]
    assert env.req("POST", base + "/metrics", "user", content=b"{nope").status_code == 400
    for path in ("../escape.txt", "/abs", "a//b", "a/./b", ""):
        r = env.req("POST", base + "/artifacts", "user", params={"path": path}, content=b"x")
        assert r.status_code == 400, path
    big = env.req(
        "POST",
        base + "/artifacts",
        "user",
        params={"path": "big.bin"},
        content=b"x" * (1024 * 1024 + 1),
    )
    assert big.status_code == 413 and "max_artifact_mb" in big.json()["error"]["message"]

    def chunked() -> Any:  # no content-length: the limit applies while streaming
        for _ in range(3):
            yield b"y" * (512 * 1024)

    big = env.req(
        "POST", base + "/artifacts", "user", params={"path": "big2.bin"}, content=chunked()
    )
    assert big.status_code == 413
    ok = env.req("POST", base + "/artifacts", "user", params={"path": "model"}, content=b"v1")
    assert ok.status_code == 201, ok.text
    again = env.req("POST", base + "/artifacts", "user", params={"path": "model"}, content=b"v2")
    assert again.status_code == 409
    clash = env.req(
        "POST", base + "/artifacts", "user", params={"path": "model/w.bin"}, content=b"w"
    )
    assert clash.status_code == 409 and "collides" in clash.json()["error"]["message"]
    with pytest.raises(NotFound, match="no dataset"):
        run.log_dataset("missing-dataset")
    with pytest.raises(FileNotFoundError):
        run.log_artifact("/nonexistent/dir")
    r = env.req("POST", "/api/runs", "read", json={"name": "nope"})
    assert r.status_code == 403  # read keys log nothing
    assert env.req("POST", "/api/runs", "user", json={"name": "bad/../\n"}).status_code == 400
    assert env.req("GET", "/api/runs/unknown").status_code == 404
    assert (
        env.req("POST", "/api/runs/unknown/metrics", "user", json={"metrics": []}).status_code
        == 404
    )
    run.end()
    r = env.req("PATCH", base, "user", json={"status": "running"})
    assert r.status_code == 409 and "already finished" in r.json()["error"]["message"]

    got = env.get(base)
    assert got["params"] == {"lr": 0.1} and got["status"] == "finished"
    assert got["inputs"] == {"datasets": [], "prompts": []}
    assert [a["path"] for a in got["artifacts"]] == ["model"]
    assert (env.root / "runs" / run.id / "model").read_bytes() == b"v1"
    files = sorted(p.name for p in (env.root / "runs" / run.id).rglob("*") if p.is_file())
    assert files == ["model"]  # no partial upload left behind
    hist = env.get(base + "/metrics", params={"key": "loss"})["data"]["loss"]
    assert [(p["step"], p["value"]) for p in hist] == [(0, 1.0)]


def test_unreachable_keel_fails_at_start() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(KeelUnreachable, match="cannot reach Keel"):
        keel.run("x", url=url, retries=0, system_metrics=False)


def test_nan_is_stored_as_null_and_steps_count_per_key(env: Env) -> None:
    with env.run("nan", system_metrics=False) as run:
        run.log_metrics({"a": 1.0, "b": float("nan")})
        run.log_metrics({"a": 2.0, "b": float("inf")})
        run.log_metric("a", 3.0, step=10)
    hist = env.get(f"/api/runs/{run.id}/metrics")["data"]
    assert [(p["step"], p["value"]) for p in hist["a"]] == [(0, 1.0), (1, 2.0), (10, 3.0)]
    assert [(p["step"], p["value"]) for p in hist["b"]] == [(0, None), (1, None)]


def test_helpers() -> None:
    assert downsample(list(range(10)), 4) == [0, 3, 6, 9]
    assert downsample([1, 2], 10) == [1, 2]
    assert check_path("./a/b.bin") == "a/b.bin"
    for bad in ("..", "a/../b", "a\\b", "x.keel-part", "a\x00b", "a" * 501):
        with pytest.raises(InvalidRequest):
            check_path(bad)


def test_runs_on_postgres(keel_factory: Any, pg_url: str) -> None:
    env = Env(keel_factory(auth={"enabled": "on"}, database_url=pg_url))
    ids = []
    for lr in (0.1, 0.2):
        with env.run("pg", params={"lr": lr}, system_metrics=False) as run:
            run.log_metrics({"loss": 1.0, "nan": float("nan")}, step=0)
            run.log_metric("loss", lr, step=1)
            run.log_artifact(__file__, name="src/test.py")
        ids.append(run.id)
    c = env.get("/api/runs/compare", params={"ids": ",".join(ids), "curves": "loss"})
    assert c["metrics"]["loss"] == [0.1, 0.2] and c["metrics"]["nan"] == [None, None]
    assert c["curves"]["loss"][ids[0]] == [[0, 1.0], [1, 0.1]]
    r = env.get(f"/api/runs/{ids[1]}")
    assert r["status"] == "finished" and [a["path"] for a in r["artifacts"]] == ["src/test.py"]
