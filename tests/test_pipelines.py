"""Pipelines: spec errors, the example end to end against a real Keel, skips and reruns,
failures, the finetune step against the fake upstream, triggers and the CI workflow."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from keel.errors import InvalidRequest
from keel.pipelines.spec import PipelineError, parse_pipeline

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "pipeline"
KEEL = [sys.executable, "-c", "from keel.cli import main; main()"]


def _cli(*args: str, cwd: Path, url: str | None = None, **env: str) -> subprocess.CompletedProcess:
    # The runner records trigger "ci" when $CI is set (as on CI machines): start clean.
    e = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_") and k != "CI"}
    if url:
        e["KEEL_URL"] = url
    e.update(env)
    return subprocess.run(
        [*KEEL, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=600
    )


def _config(tmp: Path, server: Any, fake: Any) -> Path:
    cfg = tmp / "keel.yaml"
    doc = {
        "data_dir": server.settings.data_dir,
        "local": {"enabled": False},
        "providers": {"fake": {"kind": "openai", "base_url": fake.url, "api_key_env": "FAKE_KEY"}},
    }
    cfg.write_text(yaml.safe_dump(doc))
    return cfg


@pytest.fixture
def example(tmp_path: Path) -> Path:
    dest = tmp_path / "ex"
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _steps(run: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s["status"] for s in run["steps"]}


# -- spec --------------------------------------------------------------------------


def _doc(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"name": "p", "steps": list(steps)}


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        (_doc({"name": "a", "kind": "deploy"}), "steps.0.kind: unknown step kind 'deploy'"),
        (
            _doc(
                {"name": "a", "kind": "train", "command": "x", "needs": ["b"]},
                {"name": "b", "kind": "train", "command": "x", "needs": ["a"]},
            ),
            "dependency cycle a -> b -> a",
        ),
        (
            _doc({"name": "a", "kind": "train", "command": "x ${steps.zz.outputs.run_id}"}),
            "steps.0 (a): depends on unknown step 'zz'",
        ),
        (_doc({"name": "a", "kind": "train", "command": "x", "comand": 1}), "steps.0.comand"),
        (_doc({"name": "a", "kind": "register", "model": "m"}), "give either artifact"),
    ],
)
def test_spec_errors_name_the_field(doc: dict[str, Any], needle: str) -> None:
    with pytest.raises(PipelineError) as e:
        parse_pipeline(doc, "p.yaml")
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_spec_order_follows_references() -> None:
    spec = parse_pipeline(
        _doc(
            {"name": "reg", "kind": "register", "model": "m", "run": "${steps.t.outputs.run_id}",
             "artifact": "model"},
            {"name": "t", "kind": "train", "command": "python t.py"},
        )
    )  # fmt: skip
    assert spec.order == ["t", "reg"]
    assert spec.deps["reg"] == ["t"]


def test_example_pipelines_are_valid() -> None:
    from keel.pipelines.spec import load_pipeline

    assert load_pipeline(EXAMPLE / "pipeline.yaml").order == [
        "validate", "train", "evaluate", "register"
    ]  # fmt: skip
    assert load_pipeline(EXAMPLE / "pipeline-finetune.yaml").deps["register"] == ["tune", "gate"]


def test_cli_bad_pipeline_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("name: p\nsteps:\n  - {name: a, kind: nope}\n")
    p = _cli("pipeline", "run", str(f), cwd=tmp_path)
    assert p.returncode == 1
    assert p.stderr.strip().startswith("error: ") and "unknown step kind 'nope'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = _cli("pipeline", "run", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert p.returncode == 1 and "no such file" in p.stderr and "Traceback" not in p.stderr


# -- the example end to end -----------------------------------------------------------


def test_example_pipeline_end_to_end(keel_factory: Any, fake: Any, example: Path) -> None:
    server = keel_factory()
    cfg = _config(example.parent, server, fake)
    p = _cli("pipeline", "run", "pipeline.yaml", "--config", str(cfg), cwd=example, url=server.url)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[train] trained on" in p.stdout  # the command's own output, streamed with a prefix
    assert "[evaluate] gate accuracy" in p.stdout
    pr = server.rows("pipeline_runs")
    assert len(pr) == 1 and pr[0]["status"] == "succeeded" and pr[0]["trigger_kind"] == "cli"
    links = orjson.loads(pr[0]["links"])
    assert links["registered"] == ["intent-classifier@1"]
    assert links["datasets"][0].startswith("intents@")
    train_run = links["runs"][0]
    # the candidate version, with lineage back to the run, the dataset and the pipeline
    versions = server.rows("model_versions")
    assert [(v["model"], v["version"], v["status"]) for v in versions] == [
        ("intent-classifier", 1, "candidate")
    ]
    lineage = orjson.loads(versions[0]["lineage"])
    assert lineage["run_id"] == train_run
    assert lineage["datasets"][0]["id"] == links["datasets"][0].split("@")[1]
    assert pr[0]["id"] in versions[0]["description"]
    run = next(r for r in server.rows("runs") if r["id"] == train_run)
    assert run["pipeline_run_id"] == pr[0]["id"] and run["status"] == "finished"
    curve = [
        r for r in server.rows("run_metrics") if r["run_id"] == train_run and r["key"] == "loss"
    ]
    assert len(curve) == 300 and curve[-1]["value"] < curve[0]["value"] / 2  # it really learnt
    assert Path(pr[0]["log_path"]).read_text().count("[train] ") >= 2

    # nothing changed: every step is skipped and reuses the recorded outputs (run as a
    # CI system would, which the pipeline run records as its trigger)
    p = _cli("pipeline", "run", "pipeline.yaml", "--config", str(cfg), cwd=example, url=server.url,
             CI="true")  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(r["trigger_kind"] for r in server.rows("pipeline_runs")) == ["ci", "cli"]
    rid = re.search(r"^pipeline intent-classifier run (\w+): succeeded$", p.stdout, re.M)
    assert rid, p.stdout
    second = _cli("pipeline", "show", rid.group(1), "--config", str(cfg), cwd=example)
    assert second.stdout.count(" skipped ") == 4, second.stdout
    assert len(server.rows("model_versions")) == 1

    # the dataset changes: every step runs again and a second candidate is registered
    with (example / "data" / "intents.jsonl").open("a") as f:
        f.write('{"input": "hello, is anybody there", "expected": "greeting", "split": "train"}\n')
    p = _cli("pipeline", "run", "pipeline.yaml", "--config", str(cfg), cwd=example, url=server.url)
    assert p.returncode == 0, p.stdout + p.stderr
    assert " skipped " not in p.stdout and "intent-classifier@2" in p.stdout
    assert len(server.rows("model_versions")) == 2

    # --from: that step and those after it run again; the earlier ones are reused
    p = _cli("pipeline", "run", "pipeline.yaml", "--from", "evaluate", "--config", str(cfg),
             cwd=example, url=server.url)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[validate] skipped" in p.stdout and "[train] skipped" in p.stdout
    assert "[evaluate] running" in p.stdout and "intent-classifier@3" in p.stdout
    listed = _cli("pipeline", "runs", "--config", str(cfg), cwd=example).stdout.splitlines()
    assert len(listed) == 4 and "intent-classifier@3" in listed[0]


# -- finetune ----------------------------------------------------------------------

QA = [
    {"input": "say Paris", "expected": "Paris"},
    {"input": "say green", "expected": "green"},
    {"input": "say 366", "expected": "366"},
]


def test_a_runner_on_another_store_than_the_server_says_so(
    keel_factory: Any, fake: Any, example: Path
) -> None:
    # The usual newcomer mistake: `keel up` in one directory, `keel pipeline run` in
    # another, each with its own ./.keel store. The failure must say what to fix.
    server = keel_factory()
    p = _cli("pipeline", "run", "pipeline.yaml", cwd=example, url=server.url)
    assert p.returncode == 1
    assert "must use the same store" in p.stdout + p.stderr
    assert "Traceback" not in p.stderr


def test_finetune_client_against_the_fake(fake: Any) -> None:
    from keel.pipelines.finetune import FinetuneFailed, run_finetune, training_lines

    data = training_lines(QA)
    assert orjson.loads(data.splitlines()[0])["messages"][1] == {
        "role": "assistant",
        "content": "Paris",
    }
    seen: list[str] = []
    res = run_finetune(
        fake.url, "sk", data, model="base", suffix="s1", poll_s=0.01, log=seen.append
    )
    assert res.status == "succeeded" and res.polls == 2
    assert res.fine_tuned_model == f"ft:base:s1:{res.job_id}"
    assert fake.fine_tuning.files[res.file_id]["lines"] == 3
    assert [m.split(": ")[-1] for m in seen if m.startswith("job ") and ":" in m] == [
        "running",
        "succeeded",
    ]
    with pytest.raises(FinetuneFailed, match="failed: fake failure"):
        run_finetune(fake.url, None, data, model="base", suffix="ft_fail", poll_s=0.01)
    with pytest.raises(InvalidRequest, match="no rows"):
        training_lines([])


def _ft_pipeline(tmp: Path, suffix: str) -> Path:
    (tmp / "qa.jsonl").write_text("".join(orjson.dumps(r).decode() + "\n" for r in QA))
    (tmp / "suite.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "ft-gate",
                "dataset": "qa@latest",
                "targets": [{"name": "t", "model": "gpt"}],
                "evaluators": [{"name": "accuracy", "kind": "contains"}],
                "thresholds": {"accuracy": 0.5},
            }
        )
    )
    doc = {
        "name": "ft",
        "steps": [
            {"name": "data", "kind": "validate-data", "dataset": "qa", "file": "qa.jsonl",
             "data_kind": "eval"},
            {"name": "tune", "kind": "finetune", "provider": "fake", "base_model": "fake",
             "suffix": suffix, "dataset": "${steps.data.outputs.dataset}", "poll_s": 0.01},
            {"name": "gate", "kind": "evaluate", "suite": "suite.yaml", "needs": ["tune"]},
            {"name": "reg", "kind": "register", "model": "support-ft", "needs": ["gate"],
             "deployment": {"provider": "fake",
                            "model": "${steps.tune.outputs.fine_tuned_model}"}},
        ],
    }  # fmt: skip
    f = tmp / "pipeline.yaml"
    f.write_text(yaml.safe_dump(doc, sort_keys=False))
    return f


def test_finetune_pipeline_registers_the_fine_tuned_model(
    keel_factory: Any, fake: Any, tmp_path: Path
) -> None:
    server = keel_factory()
    cfg = _config(tmp_path, server, fake)
    f = _ft_pipeline(tmp_path, "v1")
    p = _cli("pipeline", "run", str(f), "--config", str(cfg), cwd=tmp_path, url=server.url,
             FAKE_KEY="sk-fake")  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    (v,) = server.rows("model_versions")
    dep = orjson.loads(v["deployment"])
    assert dep["provider"] == "fake" and dep["model"].startswith("ft:fake:v1:ftjob-")
    (run,) = server.rows("pipeline_runs")
    links = orjson.loads(run["links"])
    assert links["fine_tuned_models"] == [dep["model"]] and len(links["eval_runs"]) == 1
    assert links["registered"] == ["support-ft@1"]


def test_a_failing_step_stops_the_pipeline(keel_factory: Any, fake: Any, tmp_path: Path) -> None:
    server = keel_factory()
    cfg = _config(tmp_path, server, fake)
    f = _ft_pipeline(tmp_path, "ft_fail")
    p = _cli("pipeline", "run", str(f), "--config", str(cfg), cwd=tmp_path, url=server.url)
    assert p.returncode == 1
    assert "step 'tune' failed: fine-tuning job ftjob-" in p.stdout
    assert "Traceback" not in p.stdout + p.stderr
    run = server.rows("pipeline_runs")[0]
    assert run["status"] == "failed" and "fake failure" in run["error"]
    steps = {s["name"]: s["status"] for s in server.rows("pipeline_steps")}
    assert steps == {"data": "succeeded", "tune": "failed", "gate": "not_run", "reg": "not_run"}
    assert server.rows("model_versions") == [] and server.rows("eval_runs") == []
    # the data step is reused by the next run; only the failed step and later ones run
    f.write_text(f.read_text().replace("ft_fail", "v2"))
    p = _cli("pipeline", "run", str(f), "--config", str(cfg), cwd=tmp_path, url=server.url)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[data] skipped: inputs unchanged" in p.stdout and "[tune] running" in p.stdout


# -- triggers ----------------------------------------------------------------------


def _trivial_pipeline(tmp: Path) -> Path:
    f = tmp / "retrain.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "name": "retrain",
                "steps": [
                    {"name": "train", "kind": "train",
                     "command": [sys.executable, "-c", "print('retraining')"]}
                ],
            }
        )
    )  # fmt: skip
    return f


def test_a_firing_alert_starts_the_pipeline_once(
    keel_factory: Any, fake: Any, tmp_path: Path
) -> None:
    import time

    import httpx

    f = _trivial_pipeline(tmp_path)
    rule = {"name": "traffic-seen", "signal": "requests", "window": "5m", "for": 0,
            "condition": {"op": "above", "threshold": 0}}  # fmt: skip
    server = keel_factory(
        alerts={"evaluation_interval_s": 0.2, "rules": [rule]},
        pipelines={
            "interval_s": 0.1,
            "pipelines": [{"name": "retrain", "file": str(f), "on_alerts": ["traffic-seen"],
                           "cooldown": "1h"}],
        },
    )  # fmt: skip
    trigger = server.app.state.pipeline_trigger
    trigger.url = server.url  # the test server listens on a free port, not settings.port
    time.sleep(1.0)  # several alert and trigger ticks: nothing fires, nothing starts
    assert server.rows("pipeline_runs") == []
    msg = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=msg)
    assert r.status_code == 200
    server.flush()  # the real alert engine now sees the call and the rule fires
    deadline = time.monotonic() + 110
    while time.monotonic() < deadline:
        runs = server.rows("pipeline_runs")
        if runs and runs[0]["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.2)
    assert len(server.rows("pipeline_runs")) == 1, trigger.stats
    (run,) = server.rows("pipeline_runs")
    assert run["status"] == "succeeded", Path(run["log_path"] or "/dev/null").read_text()
    assert run["trigger_kind"] == "alert"
    assert "alert traffic-seen firing since" in run["trigger_reason"]
    assert "threshold 0.0" in run["trigger_reason"]
    ticks = trigger.stats.ticks
    while trigger.stats.ticks < ticks + 5:  # the alert still fires: the cool-down holds
        time.sleep(0.1)
    assert len(server.rows("pipeline_runs")) == 1
    assert "[train] retraining" in Path(run["log_path"]).read_text()


def test_cron_schedule_is_due_at_the_right_time(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from keel.config.pipelines import PipelinesSettings
    from keel.pipelines.triggers import PipelineTrigger, next_fire_ms
    from keel.store.engine import make_engine, migrate

    def ms(s: str) -> int:
        return int(datetime.fromisoformat(s).replace(tzinfo=UTC).timestamp() * 1000)

    assert next_fire_ms("0 3 * * 1", ms("2026-01-05 03:00:00")) == ms("2026-01-12 03:00:00")
    assert next_fire_ms("*/15 * * * *", ms("2026-01-05 10:07:30")) == ms("2026-01-05 10:15:00")
    engine = make_engine(f"sqlite:///{tmp_path / 'k.db'}")
    migrate(engine)
    now = [ms("2026-01-05 02:59:00")]
    settings = PipelinesSettings.model_validate(
        {"pipelines": [{"name": "nightly", "file": "p.yaml", "schedule": "0 3 * * *"}]}
    )
    t = PipelineTrigger(engine, settings, url="http://x", clock=lambda: now[0])
    p = settings.pipelines[0]
    assert t.next_ms["nightly"] == ms("2026-01-05 03:00:00")
    assert t.due(p, now[0]) is None
    now[0] = ms("2026-01-05 03:00:01")
    kind, reason = t.due(p, now[0]) or ("", "")
    assert kind == "schedule" and "2026-01-05T03:00:00Z" in reason
    assert t.next_ms["nightly"] == ms("2026-01-06 03:00:00")
    assert t.due(p, now[0]) is None  # once per due time


def test_pipeline_settings_errors_name_the_field(tmp_path: Path) -> None:
    from keel.config import load_settings
    from keel.errors import ConfigError

    bad = [
        (
            {"name": "p", "file": "p.yaml", "schedule": "61 * * * *"},
            "pipelines.pipelines.0.schedule",
        ),
        (
            {"name": "p", "file": "p.yaml", "on_alerts": ["bad rule!"]},
            "pipelines.pipelines.0.on_alerts",
        ),
        ({"name": "p", "file": "p.yaml"}, "give a schedule, on_alerts, or both"),
    ]
    for item, needle in bad:
        cfg = tmp_path / "keel.yaml"
        cfg.write_text(yaml.safe_dump({"pipelines": {"pipelines": [item]}}))
        with pytest.raises(ConfigError) as e:
            load_settings(str(cfg))
        assert needle in str(e.value)


# -- CI -------------------------------------------------------------------------------


def test_ci_init_github_writes_a_workflow(tmp_path: Path) -> None:
    p = _cli("ci", "init", "github", "--dir", str(tmp_path), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    wf = yaml.safe_load((tmp_path / ".github" / "workflows" / "keel.yml").read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as true
    assert set(on) == {"pull_request", "push"} and on["push"]["branches"] == ["main"]
    check = " ".join(s.get("run", "") for s in wf["jobs"]["check"]["steps"])
    for cmd in ("ruff check", "pytest", "keel data validate", "keel eval run"):
        assert cmd in check
    assert wf["jobs"]["check"]["if"] == "github.event_name == 'pull_request'"
    runs = [s.get("run", "") for s in wf["jobs"]["pipeline"]["steps"]]
    assert "keel pipeline run pipeline.yaml" in runs
    p = _cli("ci", "init", "github", "--dir", str(tmp_path), cwd=tmp_path)
    assert p.returncode == 1 and "--force" in p.stderr
    assert (
        _cli("ci", "init", "github", "--dir", str(tmp_path), "--force", cwd=tmp_path).returncode
        == 0
    )


def test_api_lists_and_shows_pipeline_runs(keel_factory: Any, fake: Any, tmp_path: Path) -> None:
    import httpx

    server = keel_factory()
    cfg = _config(tmp_path, server, fake)
    f = _trivial_pipeline(tmp_path)
    p = _cli("pipeline", "run", str(f), "--config", str(cfg), cwd=tmp_path, url=server.url)
    assert p.returncode == 0, p.stdout + p.stderr
    runs = httpx.get(f"{server.url}/api/pipelines/runs").json()["data"]
    assert [r["pipeline"] for r in runs] == ["retrain"]
    one = httpx.get(f"{server.url}/api/pipelines/runs/{runs[0]['id']}").json()
    assert one["steps"][0]["status"] == "succeeded" and len(one["links"]["runs"]) == 1
    assert httpx.get(f"{server.url}/api/pipelines/runs/nope").status_code == 404


# -- ray ------------------------------------------------------------------------------


@pytest.fixture
def ray_cluster(tmp_path: Path) -> Any:
    """A local Ray head ($RAY_ADDRESS if set, else one started for the test)."""
    pytest.importorskip("ray.job_submission")
    if os.environ.get("RAY_ADDRESS"):
        yield os.environ["RAY_ADDRESS"]
        return
    from keel.testing.fake_upstream import _free_port

    port, dash = _free_port(), _free_port()
    ray = str(Path(sys.executable).parent / "ray")
    up = subprocess.run(
        [ray, "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=1",
         "--include-dashboard=true", "--disable-usage-stats"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )  # fmt: skip
    if up.returncode != 0:
        pytest.skip(f"cannot start a local Ray head: {up.stderr[-300:]}")
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([ray, "stop"], capture_output=True, timeout=120)


@pytest.mark.slow
def test_train_step_runs_as_a_ray_job(
    keel_factory: Any, fake: Any, tmp_path: Path, ray_cluster: str
) -> None:
    server = keel_factory()
    cfg = _config(tmp_path, server, fake)
    (tmp_path / "t.py").write_text(
        "import keel\n"
        "with keel.run(system_metrics=False) as r:\n"
        "    r.log_metric('loss', 0.5)\n"
        "    print('trained on ray')\n"
    )
    f = tmp_path / "p.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "name": "on-ray",
                "steps": [{"name": "train", "kind": "train", "executor": "ray",
                           "ray_address": ray_cluster, "command": [sys.executable, "t.py"]}],
            }
        )
    )  # fmt: skip
    p = _cli("pipeline", "run", str(f), "--config", str(cfg), cwd=tmp_path, url=server.url)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[train] submitted Ray job" in p.stdout and "[train] trained on ray" in p.stdout
    (run,) = server.rows("runs")
    assert run["status"] == "finished" and orjson.loads(run["metrics"])["loss"]["value"] == 0.5


def test_a_bad_dataset_fails_validation_and_is_not_imported(
    keel_factory: Any, fake: Any, example: Path
) -> None:
    server = keel_factory()
    cfg = _config(example.parent, server, fake)
    data = example / "data" / "intents.jsonl"
    before = data.read_bytes()
    data.write_bytes(before + b'{"input": "  ", "expected": "refund", "split": "train"}\n')
    p = _cli("pipeline", "run", "pipeline.yaml", "--config", str(cfg), cwd=example, url=server.url)
    assert p.returncode == 1
    assert "[validate] ✗ empty_fields" in p.stdout
    assert "step 'validate' failed: intents.jsonl has error-level findings" in p.stdout
    steps = {s["name"]: s["status"] for s in server.rows("pipeline_steps")}
    assert steps == {"validate": "failed", "train": "not_run", "evaluate": "not_run",
                     "register": "not_run"}  # fmt: skip
    assert server.rows("dataset_versions") == [] and server.rows("runs") == []
    assert data.read_bytes().startswith(before)  # the user's file is untouched
