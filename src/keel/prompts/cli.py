"""``keel prompts``: push, get, list, label, diff and render prompts.

Works on the store directly (``--config``), like ``keel keys``: prompts are
pushed from CI, where no Keel server needs to run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import orjson
import yaml

from keel._cli_util import cli_user as _user
from keel.errors import InvalidRequest, KeelError

config_option = click.option(
    "--config", "config", default=None, help="keel.yaml [default: ./keel.yaml if present]."
)


def _fail(msg: str) -> None:
    from keel.cli import _fail as fail  # late: keel.cli imports this module

    fail(msg)


def _open(config: str | None) -> Any:
    from keel.cli import _settings
    from keel.prompts.store import PromptStore
    from keel.store.engine import make_engine, migrate

    s = _settings(config)
    engine = make_engine(s.effective_database_url)
    migrate(engine)
    return PromptStore(engine, cache_ttl_s=0)


def _load_files(files: tuple[str, ...]) -> list[Any]:
    from keel.prompts.model import parse_spec

    specs = []
    for f in files:
        try:
            data = yaml.safe_load(Path(f).read_text(encoding="utf-8"))
        except OSError as e:
            raise InvalidRequest(f"{f}: cannot read: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise InvalidRequest(f"{f}: not valid YAML: {str(e).splitlines()[0]}") from None
        items = data if isinstance(data, list) else [data]
        for i, item in enumerate(items):
            where = f"{f}[{i}]" if isinstance(data, list) else f
            specs.append(parse_spec(item, where))
    return specs


@click.group("prompts")
def prompts() -> None:
    """Versioned prompt templates: push from files, label versions, diff, render."""


@prompts.command("push")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--message", "-m", default=None, help="Why (stored with new versions).")
@config_option
def push(files: tuple[str, ...], message: str | None, config: str | None) -> None:
    """Push prompt specs from YAML files (one spec or a list each).

    Every file is checked before anything is stored; unchanged prompts make no
    new version.
    """
    try:
        specs = _load_files(files)
        store = _open(config)
        for spec in specs:
            pv, created = store.push(spec, created_by=_user(), message=message)
            click.echo(f"{pv.prompt}: v{pv.version} ({'new' if created else 'unchanged'})")
    except KeelError as e:
        _fail(str(e))


@prompts.command("get")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the version as JSON.")
@config_option
def get(ref: str, as_json: bool, config: str | None) -> None:
    """Print a prompt (REF: name, name@label, name@3) as YAML."""
    from keel.prompts.store import spec_yaml

    try:
        pv = _open(config).get(ref)
    except KeelError as e:
        _fail(str(e))
        return
    if as_json:
        click.echo(orjson.dumps(pv.to_dict(), option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(f"# {pv.prompt} v{pv.version} (id {pv.id})")
    click.echo(spec_yaml(pv.spec), nl=False)


@prompts.command("list")
@config_option
def list_prompts(config: str | None) -> None:
    """Every prompt with its latest version and labels."""
    try:
        rows = _open(config).list()
    except KeelError as e:
        _fail(str(e))
        return
    if not rows:
        click.echo("no prompts (push some with `keel prompts push prompts/*.yaml`)")
        return
    table = [("NAME", "LATEST", "LABELS")]
    for r in rows:
        labels = ", ".join(f"{k}=v{v}" for k, v in r["labels"].items()) or "-"
        table.append((r["name"], f"v{r['latest_version']}", labels))
    widths = [max(len(t[i]) for t in table) for i in range(3)]
    for t in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip())


@prompts.command("label")
@click.argument("name")
@click.argument("version")
@click.argument("label")
@config_option
def label(name: str, version: str, label: str, config: str | None) -> None:
    """Point LABEL of prompt NAME at VERSION (3 or v3)."""
    try:
        old = _open(config).set_label(name, label, version, by=_user())
    except KeelError as e:
        _fail(str(e))
        return
    v = int(version.lstrip("v"))
    was = f" (was v{old})" if old is not None else ""
    click.echo(f"{name}: {label} → v{v}{was}")


@prompts.command("diff")
@click.argument("name")
@click.argument("a")
@click.argument("b")
@config_option
def diff(name: str, a: str, b: str, config: str | None) -> None:
    """What changed from version A to B (3, v3 or a label)."""
    try:
        va, vb, text = _open(config).compare(name, a, b)
    except KeelError as e:
        _fail(str(e))
        return
    click.echo(text or f"{name}: v{va.version} and v{vb.version} are identical", nl=not text)


@prompts.command("render")
@click.argument("ref")
@click.option("--var", "variables", multiple=True, help="k=v (JSON for non-string variables).")
@config_option
def render_cmd(ref: str, variables: tuple[str, ...], config: str | None) -> None:
    """Render a prompt with variables and print the messages as JSON."""
    from keel.prompts.model import render

    try:
        pv = _open(config).get(ref)
        values: dict[str, Any] = {}
        for item in variables:
            k, sep, raw = item.partition("=")
            if not sep or not k:
                raise InvalidRequest(f"--var {item!r}: use name=value")
            declared = pv.spec.variables.get(k)
            # A declared string takes the text as is; other types parse as JSON
            # (--var n=3, --var tags='["a"]'), and a type error names the variable.
            if declared is None or declared.type == "string":
                values[k] = raw
            else:
                try:
                    values[k] = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    values[k] = raw
        messages, model, params = render(pv.spec, values)
    except KeelError as e:
        _fail(str(e))
        return
    out = {"prompt": f"{pv.prompt}@v{pv.version}", "model": model, "params": params}
    click.echo(orjson.dumps({**out, "messages": messages}, option=orjson.OPT_INDENT_2).decode())
