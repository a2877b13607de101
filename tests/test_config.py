"""The one configuration schema: keel.yaml + KEEL_* + flags, and `keel config check`."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from keel.cli import cli
from keel.config import load_settings, reference_rows
from keel.errors import ConfigError

GOOD = """
port: 4100
recorder:
  batch_size: 200
providers:
  openai:
    kind: openai
    base_url: https://api.openai.com/v1/
    api_key_env: OPENAI_API_KEY
  claude:
    kind: anthropic
    api_key_env: ANTHROPIC_API_KEY
models:
  gpt-4o-mini: openai/gpt-4o-mini
  smart:
    deployments:
      - {provider: openai, model: gpt-4o, weight: 3, params: {temperature: 0}}
      - {provider: claude, model: claude-sonnet-4-5}
"""


def test_good_file_env_and_overrides(tmp_path):
    p = tmp_path / "keel.yaml"
    p.write_text(GOOD)
    s = load_settings(
        p,
        environ={
            "KEEL_PORT": "4200",
            "KEEL_RECORDER_BATCH_SIZE": "7",
            "KEEL_DATABASE_URL": "postgres://u@h:5432/db",
        },
        overrides={"host": "0.0.0.0", "port": None},
    )
    assert s.port == 4200 and s.host == "0.0.0.0" and s.recorder.batch_size == 7
    assert s.database_url == "postgresql+psycopg://u@h:5432/db"
    assert s.providers["openai"].base_url == "https://api.openai.com/v1"
    assert s.models["gpt-4o-mini"].deployments[0].model == "gpt-4o-mini"
    assert s.models["smart"].deployments[0].weight == 3
    assert s.effective_database_url.startswith("postgresql+psycopg://")


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings(environ={})
    assert (s.host, s.port, s.data_dir, s.local.enabled) == ("127.0.0.1", 4000, ".keel", True)
    assert s.effective_database_url == f"sqlite:///{tmp_path / '.keel' / 'keel.db'}"


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("port: 99999\n", ["port:", "less than or equal to 65535"]),
        ("prot: 4000\n", ["prot: unknown setting"]),
        (
            "recorder: {batch_size: 0, queue_size: x}\n",
            ["recorder.batch_size", "recorder.queue_size", "2 invalid"],
        ),
        ("providers: {o: {kind: openai}}\n", ["providers.o", "base_url is required"]),
        ("providers: {o: {kind: nope, base_url: http://x}}\n", ["providers.o.kind"]),
        (
            "providers: {o: {kind: openai, base_url: ftp://x}}\n",
            ["providers.o.base_url", "http://"],
        ),
        (
            "providers: {o: {kind: openai, base_url: 'http://x', api_key_env: 'sk-123abc'}}\n",
            ["api_key_env", "NAME of an environment variable"],
        ),
        ("models: {m: ghost/x}\n", ["models.m.deployments.0.provider", "unknown provider 'ghost'"]),
        ("models: {m: justaname}\n", ["provider/model"]),
        ("models: {m: {deployments: []}}\n", ["models.m.deployments"]),
        ("database_url: mysql://x\n", ["database_url", "postgresql://"]),
        ("- a\n- b\n", ["top level must be a mapping"]),
        ("port: [unclosed\n", ["not valid YAML"]),
    ],
)
def test_bad_config_names_each_entry(tmp_path, text, needles):
    p = tmp_path / "keel.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_settings(p, environ={})
    for n in needles:
        assert n in str(ei.value)
    res = CliRunner().invoke(cli, ["config", "check", "--config", str(p)])
    assert res.exit_code == 1 and res.output.startswith("error: ")
    assert "Traceback" not in res.output


def test_bad_env_value_is_reported(tmp_path):
    with pytest.raises(ConfigError, match=r"recorder\.batch_size"):
        load_settings(None, environ={"KEEL_RECORDER_BATCH_SIZE": "lots"})


def test_config_check_ok_and_missing_file(tmp_path, monkeypatch):
    p = tmp_path / "keel.yaml"
    p.write_text(GOOD)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    res = CliRunner().invoke(cli, ["config", "check", "--config", str(p)])
    assert res.exit_code == 0, res.output
    assert "configuration OK: 2 provider(s)" in res.output and "smart" in res.output
    assert "OPENAI_API_KEY is not set" in res.output
    res = CliRunner().invoke(cli, ["config", "check", "--config", str(tmp_path / "no.yaml")])
    assert res.exit_code == 1 and "does not exist" in res.output


def test_reference_lists_every_setting_with_its_env_var():
    rows = {r[0]: r for r in reference_rows()}
    assert rows["recorder.batch_size"][1] == "KEEL_RECORDER_BATCH_SIZE"
    assert rows["database_url"][1] == "KEEL_DATABASE_URL"
    assert all(r[4] for r in rows.values()), "every setting has a doc"
    res = CliRunner().invoke(cli, ["config", "reference"])
    assert res.exit_code == 0 and "`KEEL_GATEWAY_MAX_BODY_BYTES`" in res.output


def test_version_and_help():
    r = CliRunner().invoke(cli, ["version"])
    assert r.exit_code == 0 and r.output.startswith("keel ")
    for sub in (
        ["--help"],
        ["up", "--help"],
        ["traces", "list", "--help"],
        ["config", "check", "--help"],
        ["db", "upgrade", "--help"],
    ):
        r = CliRunner().invoke(cli, sub)
        assert r.exit_code == 0 and "Usage:" in r.output


def test_readme_settings_table_is_current():
    """The README's reference is `keel config reference`, regenerated, not hand-kept."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("| keel.yaml | environment | type | default | meaning |")
    table = readme[start : readme.index("\n\n## HTTP API", start)]
    res = CliRunner().invoke(cli, ["config", "reference"])
    expected = res.output.strip()
    for t in ("str", "float", "int"):
        expected = expected.replace(f"| {t} | None |", f"| {t} \\| None |")
    assert table == expected, "run `keel config reference` and paste it into README.md"
