"""The model registry: versions, approvals by role, aliases, audit, on a real Keel with keys on."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import keel
from keel.auth.guard import required_roles
from keel.prompts.store import PromptStore
from keel.registry.cli import registry as registry_cli
from keel.registry.service import RegistryService
from keel.runs.artifacts import ArtifactStore
from keel.runs.store import RunStore
from keel.store.engine import make_engine, migrate

ROLES = ("user", "read", "approver", "admin")
GREET = {
    "name": "greet",
    "messages": [{"role": "user", "content": "{{ name }}"}],
    "variables": {"name": {"type": "string"}},
}
DEPLOY_YAML = """\
provider: fake
model: gpt-4o-mini
prompt: greet
params:
  temperature: 0.2
  max_tokens: 256
"""


class Reg:
    """A Keel with auth on, one key per role, a finished run with a model directory."""

    def __init__(self, server: Any, tmp: Path) -> None:
        self.server = server
        self.url = server.url
        ks = server.state.keystore
        self.keys = {role: ks.create(f"{role}-key", role=role)[1] for role in ROLES}
        self.engine = server.state.engine
        PromptStore(self.engine).push(GREET, created_by="test")
        model_dir = tmp / "model"
        model_dir.mkdir()
        (model_dir / "weights.safetensors").write_bytes(b"w" * 100)
        (model_dir / "config.json").write_text("{}")
        with keel.run(
            "train",
            url=self.url,
            api_key=self.keys["user"],
            params={"lr": 0.1},
            system_interval_s=0.05,
        ) as run:
            run.log_prompt("greet")
            for s in range(5):
                run.log_metrics({"loss": 1 / (s + 1), "accuracy": 0.5 + s / 10}, step=s)
            run.log_artifact(model_dir)
        self.run_id = run.id
        with (
            pytest.raises(RuntimeError),
            keel.run(
                "broken", url=self.url, api_key=self.keys["user"], system_metrics=False
            ) as bad,
        ):
            bad.log_artifact(model_dir)
            raise RuntimeError("diverged")
        self.failed_run_id = bad.id

    def req(self, method: str, path: str, role: str = "admin", **kw: Any) -> httpx.Response:
        h = {"Authorization": f"Bearer {self.keys[role]}"}
        return httpx.request(method, f"{self.url}/api/registry{path}", headers=h, timeout=30, **kw)

    def ok(self, method: str, path: str, role: str = "admin", **kw: Any) -> Any:
        r = self.req(method, path, role, **kw)
        assert r.status_code in (200, 201), r.text
        return r.json()

    def count(self, table: str) -> int:
        with self.engine.connect() as c:
            return c.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar()

    def audit(self, model: str, want: int) -> list[dict[str, Any]]:
        """The model's audit rows once at least ``want`` are there (the auth layer writes
        its rows after the response, in the background)."""
        deadline = time.monotonic() + 10
        while True:
            rows = self.ok("GET", "/audit", "read", params={"model": model})["data"]
            if len(rows) >= want or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)


@pytest.fixture
def reg(keel_factory: Any, tmp_path: Path) -> Reg:
    return Reg(keel_factory(auth={"enabled": "on"}), tmp_path)


def _artifact_body(reg: Reg, **kw: Any) -> dict[str, Any]:
    return {"run_id": reg.run_id, "artifact": "model", **kw}


def test_roles_of_registry_routes() -> None:
    base = "/api/registry/models/m/versions/3"
    assert required_roles("POST", base + "/approve") == {"approver", "admin"}
    assert required_roles("POST", base + "/reject") == {"approver", "admin"}
    assert required_roles("POST", "/api/registry/models/m/versions") == {"admin"}
    assert required_roles("PUT", "/api/registry/models/m/aliases/production") == {"admin"}
    assert required_roles("GET", "/api/registry/models") == {"read", "approver", "admin"}
    assert required_roles("POST", "/api/runs/x/metrics") == {"user", "approver", "admin"}


def test_register_approve_reject_and_audit(reg: Reg) -> None:
    card = "# Support model\n\nFine-tuned on support chats."
    v1 = reg.ok(
        "POST", "/models/support/versions", json=_artifact_body(reg, card=card, metrics={"f1": 0.8})
    )
    assert (v1["version"], v1["kind"], v1["status"]) == (1, "artifact", "candidate")
    assert v1["aliases"] == ["candidate"] and v1["card"] == card
    assert v1["artifact_uri"].endswith(f"/runs/{reg.run_id}/model")
    assert v1["metrics"]["f1"] == 0.8 and v1["metrics"]["loss"] == pytest.approx(0.2)
    assert not any(k.startswith("system/") for k in v1["metrics"])
    assert v1["lineage"]["run_id"] == reg.run_id
    assert [p["name"] for p in v1["lineage"]["prompts"]] == ["greet"]
    assert v1["created_by"].startswith("admin-key")
    v2 = reg.ok(
        "POST",
        "/models/support/versions",
        json={
            "deployment": {
                "provider": "fake",
                "model": "gpt-4o-mini",
                "prompt": "greet",
                "params": {"temperature": 0},
            }
        },
    )
    assert (v2["version"], v2["kind"], v2["aliases"]) == (2, "deployment", ["candidate"])
    assert v2["deployment"]["prompt"] == "greet@1" and v2["lineage"]["run_id"] is None

    # Approving needs the approver role: a user or read key is refused, and audited.
    for role in ("user", "read"):
        r = reg.req("POST", "/models/support/versions/1/approve", role, json={"note": "lgtm"})
        assert r.status_code == 403, r.text
        assert "needs role approver or admin" in r.json()["error"]["message"]
    assert reg.ok("GET", "/models/support/versions/1", "read")["status"] == "candidate"
    calls: list[dict[str, Any]] = []
    reg.server.app.state.registry.on_approved.append(calls.append)
    got = reg.ok(
        "POST", "/models/support/versions/1/approve", "approver", json={"note": "eval suite passed"}
    )
    assert got["status"] == "approved" and "approved" in got["aliases"]
    assert got["decisions"][0]["decision"] == "approve"
    assert got["decisions"][0]["principal"].startswith("approver-key")
    assert got["decisions"][0]["note"] == "eval suite passed"
    assert [c["version"] for c in calls] == [1]

    r = reg.req("POST", "/models/support/versions/1/approve", "approver")
    assert (
        r.status_code == 409 and "already approved by approver-key" in r.json()["error"]["message"]
    )
    r = reg.req("POST", "/models/support/versions/1/reject", "approver", json={"note": "x"})
    assert r.status_code == 409 and "a decision is final" in r.json()["error"]["message"]
    r = reg.req("POST", "/models/support/versions/2/reject", "approver", json={})
    assert r.status_code == 400 and "needs a note" in r.json()["error"]["message"]
    got = reg.ok(
        "POST", "/models/support/versions/2/reject", "approver", json={"note": "too slow at p95"}
    )
    assert got["status"] == "rejected" and got["aliases"] == []  # candidate left it
    r = reg.req("POST", "/models/support/versions/2/approve", "approver")
    assert r.status_code == 409
    msg = r.json()["error"]["message"]
    assert "was rejected" in msg and "too slow at p95" in msg
    assert calls and len(calls) == 1
    for path in (
        "/models/nope/versions/1/approve",
        "/models/support/versions/9/approve",
        "/models/support/versions/staging/approve",
    ):
        assert reg.req("POST", path, "approver").status_code == 404, path
    assert reg.req("GET", "/models/nope", "read").status_code == 404
    assert reg.req("GET", "/models/support/versions/7", "read").status_code == 404

    rows = reg.audit("support", 12)
    acts = [(a["action"], a["status"], a["principal"].split(" ")[0]) for a in rows]
    assert ("registry.register", None, "admin-key") in acts
    assert ("registry.approve", None, "approver-key") in acts
    assert ("registry.reject", None, "approver-key") in acts
    refused = [a for a in rows if a["status"] == 403]
    assert {a["principal"].split(" ")[0] for a in refused} == {"user-key", "read-key"}
    assert all(
        a["action"] == "POST /api/registry/models/support/versions/1/approve" for a in refused
    )
    assert any(a["status"] == 409 and a["target"] == "registry/support/v1" for a in rows)
    approve = next(a for a in rows if a["action"] == "registry.approve")
    assert approve["details"]["note"] == "eval suite passed"
    assert approve["details"]["moved"] == {"approved": {"from": None, "to": 1}}
    assert approve["target"] == "registry/support/v1"
    # Successful requests appear once, as the registry's own row.
    assert not any(a["status"] == 200 for a in rows)


def test_aliases_and_stages(reg: Reg) -> None:
    for _ in range(3):
        reg.ok("POST", "/models/m/versions", json=_artifact_body(reg))
    for v in (1, 2, 3):
        if v != 2:
            reg.ok("POST", f"/models/m/versions/{v}/approve", "approver")
    r = reg.req("PUT", "/models/m/aliases/production", json={"version": 2})
    assert r.status_code == 409 and "only an approved version" in r.json()["error"]["message"]
    r = reg.req("PUT", "/models/m/aliases/production", "approver", json={"version": 1})
    assert r.status_code == 403  # moving production is an admin act (the deploy step's)
    got = reg.ok("PUT", "/models/m/aliases/production", json={"version": 1, "note": "launch"})
    assert got["moved"] == {"production": {"from": None, "to": 1}}
    got = reg.ok("PUT", "/models/m/aliases/production", json={"version": "v3"})
    assert got["moved"] == {"production": {"from": 1, "to": 3}, "previous": {"from": None, "to": 1}}
    assert reg.ok("GET", "/models/m/versions/production", "read")["version"] == 3
    assert reg.ok("GET", "/models/m/versions/previous", "read")["version"] == 1
    again = reg.ok("PUT", "/models/m/aliases/production", json={"version": 3})
    assert again["changed"] is False
    # A custom alias; the approved alias moves only by approving.
    reg.ok("PUT", "/models/m/aliases/shadow", json={"version": 2})
    assert reg.req("PUT", "/models/m/aliases/approved", json={"version": 2}).status_code == 400
    assert reg.req("PUT", "/models/m/aliases/1bad", json={"version": 2}).status_code == 400
    assert reg.req("PUT", "/models/m/aliases/x", json={"version": 9}).status_code == 404
    m = reg.ok("GET", "/models/m", "read")
    assert m["aliases"] == {
        "approved": 3,
        "candidate": 3,
        "previous": 1,
        "production": 3,
        "shadow": 2,
    }
    reg.ok("DELETE", "/models/m/aliases/shadow", params={"note": "done"})
    assert reg.req("DELETE", "/models/m/aliases/shadow").status_code == 404
    listed = reg.ok("GET", "/models", "read")["data"]
    assert [(x["name"], x["versions"], x["latest_version"]) for x in listed] == [("m", 3, 3)]
    rows = reg.audit("m", 1)
    sets = [a for a in rows if a["action"] == "registry.alias.set"]
    assert [a["details"]["version"] for a in sets] == [2, 3, 1]  # newest first, no-op unrecorded
    assert sets[-1]["details"]["note"] == "launch"
    assert any(a["action"] == "registry.alias.delete" for a in rows)


def test_bad_input_writes_nothing(reg: Reg) -> None:
    before = {t: reg.count(t) for t in ("registered_models", "model_versions", "model_aliases")}
    audit_before = reg.count("audit_log WHERE action LIKE 'registry.%'")
    cases = [
        ("/models/bad name!/versions", _artifact_body(reg), 400, "invalid model name"),
        (
            "/models/ok/versions",
            _artifact_body(reg, artifact="missing"),
            400,
            "no artifact 'missing'",
        ),
        ("/models/ok/versions", _artifact_body(reg, artifact="../x"), 400, "invalid artifact path"),
        ("/models/ok/versions", {"artifact": "model"}, 400, "needs the run"),
        ("/models/ok/versions", {"run_id": "nope", "artifact": "model"}, 400, "no run 'nope'"),
        (
            "/models/ok/versions",
            {"run_id": reg.failed_run_id, "artifact": "model"},
            409,
            "is failed",
        ),
        ("/models/ok/versions", {}, 400, "either an artifact"),
        (
            "/models/ok/versions",
            {**_artifact_body(reg), "deployment": {"provider": "fake"}},
            400,
            "either",
        ),
        (
            "/models/ok/versions",
            {"deployment": {"provider": "fake"}},
            400,
            "deployment.model: Field required",
        ),
        (
            "/models/ok/versions",
            {"deployment": {"provider": "fake", "model": "x", "tempo": 1}},
            400,
            "deployment.tempo: Extra inputs",
        ),
        (
            "/models/ok/versions",
            {"deployment": {"provider": "acme", "model": "x"}},
            400,
            "no provider 'acme'",
        ),
        (
            "/models/ok/versions",
            {"deployment": {"provider": "fake", "model": "x", "prompt": "ghost"}},
            400,
            "deployment.prompt",
        ),
        ("/models/ok/versions", {"deployment": ["not", "a", "mapping"]}, 400, "deployment"),
        (
            "/models/ok/versions",
            _artifact_body(reg, metrics={"f1": "high"}),
            400,
            "must be a number",
        ),
        ("/models/ok/versions", _artifact_body(reg, card="x" * (600 * 1024)), 400, "max_card_kb"),
    ]
    for path, body, status, text in cases:
        r = reg.req("POST", path, json=body)
        assert r.status_code == status, (body, r.text)
        assert text in r.json()["error"]["message"], (text, r.text)
    after = {t: reg.count(t) for t in before}
    assert after == before
    assert reg.count("audit_log WHERE action LIKE 'registry.%'") == audit_before


def test_cli_against_a_real_server(reg: Reg, tmp_path: Path) -> None:
    run = CliRunner().invoke

    def cli(role: str, *args: str) -> Any:
        return run(
            registry_cli, list(args), env={"KEEL_URL": reg.url, "KEEL_API_KEY": reg.keys[role]}
        )

    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(DEPLOY_YAML)
    card = tmp_path / "README.md"
    card.write_text("# Card\n")
    res = cli(
        "admin",
        "register",
        "bot",
        "--run",
        reg.run_id,
        "--artifact",
        "model",
        "--card",
        str(card),
        "--metrics",
        '{"win_rate": 0.61}',
    )
    assert res.exit_code == 0 and "registered bot v1 (artifact, candidate)" in res.output, (
        res.output
    )
    res = cli("admin", "register", "bot", "--deployment", str(deploy))
    assert res.exit_code == 0 and "registered bot v2 (deployment, candidate)" in res.output
    res = cli("user", "approve", "bot", "1", "--note", "ship it")
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "error: this key has role 'user'; POST /api/registry/models/bot/versions/1/approve "
        "needs role approver or admin"
    ]
    res = cli("approver", "approve", "bot", "1", "--note", "ship it")
    assert res.exit_code == 0 and res.output.strip() == "approved bot v1"
    res = cli("approver", "approve", "bot", "1")
    assert res.exit_code == 1 and res.output.startswith("error: bot v1 is already approved")
    assert len(res.output.strip().splitlines()) == 1
    res = cli("approver", "reject", "bot", "2", "--note", "hallucinates")
    assert res.exit_code == 0 and res.output.strip() == "rejected bot v2"
    res = cli("approver", "reject", "bot", "2")  # --note is required
    assert res.exit_code == 2
    res = cli("admin", "alias", "bot", "production", "1")
    assert res.exit_code == 0 and "production v1 (was unset)" in res.output
    res = cli("read", "list")
    assert res.exit_code == 0 and "bot" in res.output and "production=v1" in res.output
    res = cli("read", "show", "bot")
    assert res.exit_code == 0 and "rejected" in res.output and "approved" in res.output
    res = cli("read", "show", "bot", "production")
    assert (
        res.exit_code == 0 and "approved by approver-key" in res.output and "# Card" in res.output
    )
    assert "metric win_rate = 0.61" in res.output
    res = cli("read", "audit", "bot")
    assert res.exit_code == 0 and "registry.approve" in res.output and "ship it" in res.output
    res = cli("read", "show", "ghost")
    assert res.exit_code == 1 and res.output.startswith("error: no model 'ghost'")

    bad = tmp_path / "bad.yaml"
    bad.write_text("provider: [unclosed\n")
    res = cli("admin", "register", "bot", "--deployment", str(bad))
    assert res.exit_code == 1 and res.output.startswith(f"error: {bad}: invalid YAML")
    assert len(res.output.strip().splitlines()) == 1
    bad.write_text("provider: fake\nmodel: x\nextra: 1\n")
    res = cli("admin", "register", "bot", "--deployment", str(bad))
    assert res.exit_code == 1 and "deployment.extra: Extra inputs" in res.output
    res = cli("admin", "register", "bot", "--deployment", str(tmp_path / "none.yaml"))
    assert res.exit_code == 1 and "cannot read deployment file" in res.output
    res = cli("admin", "register", "bot", "--artifact", "model")
    assert res.exit_code == 1 and "--run" in res.output
    res = cli(
        "admin", "register", "bot", "--run", reg.run_id, "--artifact", "model", "--metrics", "{oops"
    )
    assert res.exit_code == 1 and "--metrics is not JSON" in res.output
    assert [v["version"] for v in reg.ok("GET", "/models/bot", "read")["versions"]] == [2, 1]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_registrations_get_distinct_numbers(
    backend: str, tmp_path: Path, request: Any
) -> None:
    url = (
        request.getfixturevalue("pg_url")
        if backend == "postgresql"
        else f"sqlite:///{tmp_path / 'k.db'}"
    )
    engine = make_engine(url)
    migrate(engine)
    runs, prompts = RunStore(engine), PromptStore(engine)
    svc = RegistryService(
        engine, runs, ArtifactStore(engine, str(tmp_path / "a")), prompts, providers=["fake"]
    )
    got: list[int] = []
    errors: list[Exception] = []

    def register(i: int) -> None:
        try:
            v = svc.register(
                "race", principal=f"t{i}", deployment={"provider": "fake", "model": f"m{i}"}
            )
            got.append(v["version"])
        except Exception as e:  # pragma: no cover - the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and sorted(got) == list(range(1, 9))
    assert svc.get_version("race", "candidate")["version"] == 8
    with engine.connect() as c:
        n = c.execute(sa.text("SELECT COUNT(*) FROM audit_log WHERE action='registry.register'"))
        assert n.scalar() == 8
    engine.dispose()
