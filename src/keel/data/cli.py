"""``keel data``: import, prepare, list, show, diff and export datasets, on the store directly.

(``keel data validate`` is added by the checks module.)
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import click

from keel._cli_util import cli_user as _user
from keel.data.io import KINDS, canonical_rows, parse_mapping, read_file
from keel.data.versions import EXPORT_FORMATS, DatasetStore, VersionInfo

config_option = click.option(
    "--config", "config", default=None, help="keel.yaml [default: ./keel.yaml if present]."
)


def open_store(config: str | None, *, progress: bool = True) -> DatasetStore:
    """The dataset store of the configured data dir / artifact root (migrates the schema)."""
    from keel.cli import _fail, _settings
    from keel.errors import KeelError
    from keel.store.engine import make_engine, migrate

    s = _settings(config)
    engine = make_engine(s.effective_database_url)
    try:
        migrate(engine)
    except KeelError as e:
        _fail(str(e))
    return DatasetStore(engine, s.artifact_root, progress=progress)


def _run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a Keel error (or a file error) becomes one line and exit 1."""
    from keel.cli import _fail
    from keel.errors import KeelError

    try:
        return fn(*args, **kwargs)
    except KeelError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{e.strerror or e}: {getattr(e, 'filename', '') or ''}".rstrip(": "))


def _date(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def _splits(v: VersionInfo) -> str:
    return ",".join(f"{k}:{n}" for k, n in sorted(v.splits.items())) or "-"


def _report(v: VersionInfo) -> None:
    what = "created" if v.created else "unchanged: already stored as"
    click.echo(f"{what} {v.dataset}@{v.id[:12]} ({v.kind}, {v.rows} rows, splits {_splits(v)})")


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@click.group("data")
def data() -> None:
    """Datasets: import, prepare, list, show, diff and export content-hash versions."""


@data.command("import")
@click.argument("path")
@click.option("--name", required=True, help="Dataset name (created on first import).")
@click.option("--kind", type=click.Choice(KINDS), required=True, help="Row shape.")
@click.option("--map", "maps", multiple=True, help="FIELD=COLUMN, e.g. input=question.")
@click.option(
    "--format", "fmt", type=click.Choice(["auto", "jsonl", "csv", "parquet"]), default="auto"
)
@click.option("--description", default=None, help="Dataset description (first import).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@config_option
def import_(
    path: str,
    name: str,
    kind: str,
    maps: tuple[str, ...],
    fmt: str,
    description: str | None,
    quiet: bool,
    config: str | None,
) -> None:
    """Import a JSONL, CSV or Parquet file (path or fsspec URL) as a new version."""
    mapping = _run(parse_mapping, maps)
    store = open_store(config, progress=not quiet)
    rows = canonical_rows(read_file(path, fmt=fmt, mapping=mapping), kind)
    source = {"type": "file", "path": path, "format": fmt, "map": mapping}
    v = _run(
        store.write_version,
        name,
        kind,
        rows,
        source=source,
        created_by=_user(),
        description=description,
    )
    _report(v)


@data.command("from-traces")
@click.option("--name", required=True, help="Dataset name.")
@click.option("--kind", type=click.Choice(["chat", "eval"]), default="chat", show_default=True)
@click.option("--filter", "filters", multiple=True, help="model=…, feature=…, user=…, provider=…")
@click.option("--since", default=None, help="An age (7d, 24h), ISO 8601 or epoch ms.")
@click.option("--until", default=None, help="An age (1h), ISO 8601 or epoch ms.")
@click.option("--sample", type=click.FloatRange(0, 1, min_open=True), default=1.0,
              help="Keep this share of the traces (deterministic by trace id).")  # fmt: skip
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N rows.")
@click.option("--label-with", "label_with", default=None,
              help="Label rows with this evaluator (an evals.online name, or a kind).")  # fmt: skip
@click.option("--label-params", "label_params", default=None,
              help="JSON options of the --label-with evaluator.")  # fmt: skip
@click.option("--quiet", is_flag=True, help="No progress bar.")
@config_option
def from_traces_cmd(
    name: str,
    kind: str,
    filters: tuple[str, ...],
    since: str | None,
    until: str | None,
    sample: float,
    limit: int | None,
    label_with: str | None,
    label_params: str | None,
    quiet: bool,
    config: str | None,
) -> None:
    """Import successful chat calls recorded by the gateway as a new version.

    With --label-with, an evaluator or judge labels every row (chat: in
    metadata.labelled_by; eval: as `expected`, the answer moving to
    metadata.output); rows it cannot label are left out.
    """
    from keel.cli import _fail
    from keel.data.io import from_traces
    from keel.tracing.api import parse_time

    f: dict[str, str] = {}
    for item in filters:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            _fail(f"--filter takes KEY=VALUE (e.g. model=gpt-4o), not {item!r}")
        f[k.strip()] = v.strip()
    since_ms = _run(parse_time, since, "since")
    until_ms = _run(parse_time, until, "until")
    if label_params and not label_with:
        _fail("--label-params needs --label-with")
    store = open_store(config, progress=not quiet)
    stats: dict[str, int] = {}
    rows = from_traces(store.engine, filters=f, since=since_ms, until=until_ms, kind=kind,
                       stats=stats, sample=sample, limit=limit)  # fmt: skip
    source: dict[str, Any] = {
        "type": "traces", "filters": f, "since_ms": since_ms, "until_ms": until_ms
    }  # fmt: skip
    if sample < 1 or limit is not None:
        source.update(sample=sample, limit=limit)
    steps: list[dict[str, Any]] = []
    if label_with:
        from keel.cli import _settings
        from keel.evals.labelling import label_rows, make_labeller

        s = _settings(config)
        lab = _run(make_labeller, s, label_with, label_params, store.engine, os.environ)
        rows = label_rows(lab, store.engine, rows, kind, stats, concurrency=s.evals.concurrency)
        steps.append(lab.step)
        source["labelled_by"] = lab.step["params"]
    v = _run(store.write_version, name, kind, rows, source=source, steps=steps,
             created_by=_user())  # fmt: skip
    _report(v)
    if stats.get("skipped"):
        click.echo(f"skipped {stats['skipped']} traces without a usable captured body")
    if label_with:
        click.echo(f"labelled {stats.get('labelled', 0)} rows with {label_with}")
        if stats.get("unlabelled"):
            click.echo(f"left out {stats['unlabelled']} rows the evaluator could not label")


@data.command("prepare")
@click.argument("ref")
@click.option("--step", "steps", multiple=True, help="name[:k=v,…], e.g. split:train=0.9,seed=1")
@click.option("--steps-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML list of steps ({step, params} or name).")  # fmt: skip
@click.option("--quiet", is_flag=True, help="No progress bar.")
@config_option
def prepare_cmd(
    ref: str, steps: tuple[str, ...], steps_file: str | None, quiet: bool, config: str | None
) -> None:
    """Run preprocessing steps over REF (name, name@id or id) into a new version.

    Steps: normalize, dedupe, redact, filter_length, split.
    """
    import yaml

    from keel.cli import _fail
    from keel.data.prepare import prepare

    specs: list[Any] = list(steps)
    if steps_file:
        try:
            with open(steps_file, encoding="utf-8") as fh:
                loaded = yaml.safe_load(fh)
        except yaml.YAMLError as e:
            _fail(f"{steps_file}: not valid YAML ({e})")
        if isinstance(loaded, dict) and "steps" in loaded:
            loaded = loaded["steps"]
        if not isinstance(loaded, list):
            _fail(f"{steps_file}: expected a list of steps")
        specs += loaded
    if not specs:
        _fail("give at least one --step (or --steps-file)")
    store = open_store(config, progress=not quiet)
    v = _run(prepare, store, ref, specs, created_by=_user())
    _report(v)


@data.command("list")
@config_option
def list_cmd(config: str | None) -> None:
    """Every dataset with its latest version."""
    store = open_store(config, progress=False)
    items = _run(store.list)
    if not items:
        click.echo("no datasets (import one with `keel data import FILE --name N --kind chat`)")
        return
    rows = [("NAME", "KIND", "VERSIONS", "LATEST", "ROWS", "SPLITS", "CREATED")]
    for d in items:
        lv = d["latest"]
        rows.append(
            (
                d["name"],
                d["kind"],
                str(d["versions"]),
                lv["id"][:12] if lv else "-",
                str(lv["rows"]) if lv else "-",
                ",".join(f"{k}:{n}" for k, n in sorted(lv["splits"].items())) if lv else "-",
                _date(lv["created_at_ms"]) if lv else "-",
            )
        )
    _table(rows)


@data.command("show")
@click.argument("ref")
@click.option("--rows", "n", type=click.IntRange(min=0), default=3, show_default=True)
@config_option
def show_cmd(ref: str, n: int, config: str | None) -> None:
    """A version's metadata, lineage and first rows (REF: name, name@id, id)."""
    import itertools

    import orjson

    store = open_store(config, progress=False)
    v = _run(store.get, ref)
    click.echo(f"{v.dataset}@{v.id}")
    click.echo(f"  kind     {v.kind}")
    click.echo(f"  rows     {v.rows}   splits {_splits(v)}")
    click.echo(f"  parent   {v.parent_id or '-'}")
    click.echo(f"  created  {_date(v.created_at_ms)} by {v.created_by or '-'}")
    click.echo(f"  source   {orjson.dumps(v.source).decode() if v.source else '-'}")
    click.echo(f"  uri      {v.uri}")
    for i, s in enumerate(v.steps, 1):
        click.echo(f"  step {i}   {s['step']} {orjson.dumps(s.get('params') or {}).decode()}")
    if v.validation:
        click.echo(f"  validation {orjson.dumps(v.validation).decode()}")
    for row in _run(lambda: list(itertools.islice(store.read_rows(v), n))):
        click.echo("  " + orjson.dumps(row).decode()[:300])


@data.command("diff")
@click.argument("a")
@click.argument("b")
@config_option
def diff_cmd(a: str, b: str, config: str | None) -> None:
    """Rows added and removed from version A to B (by content)."""
    import orjson

    store = open_store(config, progress=False)
    d = _run(store.diff, a, b)
    click.echo(f"{d['a'][:12]} ({d['rows_a']} rows) → {d['b'][:12]} ({d['rows_b']} rows)")
    click.echo(f"  +{d['added']} added, -{d['removed']} removed")
    for r in d["examples_added"]:
        click.echo("  + " + orjson.dumps(r).decode()[:200])
    for r in d["examples_removed"]:
        click.echo("  - " + orjson.dumps(r).decode()[:200])


@data.command("export")
@click.argument("ref")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True)
@click.option("--out", "dest", required=True, help="File or directory (path or fsspec URL).")
@click.option("--split", default=None, help="Only this split.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@config_option
def export_cmd(
    ref: str, fmt: str, dest: str, split: str | None, quiet: bool, config: str | None
) -> None:
    """Write a version as OpenAI fine-tuning JSONL, JSONL, Parquet or a Hugging Face layout."""
    store = open_store(config, progress=not quiet)
    files = _run(store.export, ref, fmt, dest, split=split)
    for f in files:
        click.echo(f"wrote {f}")


def _add_validate() -> None:
    from keel.data.validate_cli import validate_command

    data.add_command(validate_command)


_add_validate()
