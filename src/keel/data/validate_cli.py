"""``keel data validate``: run the dataset checks on a file or a stored version.

A local file (.jsonl, .csv, .parquet) is read here directly, so a file can be
checked before it is imported. Exit status: 0 clean (at the ``--fail-on``
level), 1 findings at that level, 2 unreadable input or bad options.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import orjson

from keel.errors import InvalidRequest, KeelError

_JSON_FIELDS = ("messages", "metadata", "input", "expected")


def _parse_line(raw: bytes, where: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    # Invalid UTF-8 or lone-surrogate escapes: keep them (as surrogates) so the
    # invalid_utf8 check reports the row instead of the reader failing.
    try:
        return json.loads(raw.decode("utf-8", "surrogateescape"))
    except ValueError as e:
        raise InvalidRequest(f"{where}: not valid JSON ({e})") from None


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                yield _parse_line(raw, f"{path.name} line {n}")


def read_csv(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
        for n, rec in enumerate(csv.DictReader(f), 2):
            row: dict[str, Any] = dict(rec)
            for k in _JSON_FIELDS:  # structured columns hold JSON text
                v = row.get(k)
                if isinstance(v, str) and v[:1] in ("[", "{"):
                    try:
                        row[k] = json.loads(v)
                    except ValueError as e:
                        if k == "messages":
                            raise InvalidRequest(
                                f"{path.name} line {n}: column messages is not JSON ({e})"
                            ) from None
            if row.get("split") == "":
                row["split"] = None
            if row.get("expected") == "":
                row["expected"] = None
            yield row


def read_parquet(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise InvalidRequest(f"{path.name}: not a readable Parquet file ({e})") from None
    for batch in pf.iter_batches(batch_size=8192):
        yield from batch.to_pylist()


READERS = {".jsonl": read_jsonl, ".ndjson": read_jsonl, ".csv": read_csv}
READERS[".parquet"] = read_parquet


def read_file(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a local JSONL, CSV or Parquet file, lazily."""
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise InvalidRequest(f"{path.name}: unsupported file type; use .jsonl, .csv or .parquet")
    return reader(path)


def guess_kind(row: Any) -> str:
    if isinstance(row, dict):
        if "messages" in row:
            return "chat"
        if "prompt" in row or "completion" in row:
            return "completion"
        if "input" in row:
            return "eval"
    raise InvalidRequest("cannot tell the dataset kind from the first row; give --kind")


def _peek(rows: Iterator[dict[str, Any]]) -> tuple[Any, Iterator[dict[str, Any]]]:
    try:
        first = next(rows)
    except StopIteration:
        return None, iter(())

    def chain() -> Iterator[dict[str, Any]]:
        yield first
        yield from rows

    return first, chain()


def _open_ref(
    ref: str, config: str | None
) -> tuple[str | None, Iterator[dict[str, Any]], Any, Any]:
    try:
        from keel.data.cli import open_store
    except ImportError:
        raise InvalidRequest(f"{ref}: no such file") from None
    store = open_store(config, progress=False)
    info = store.get(ref)
    return info.kind, store.read_rows(info), store, info


@click.command("validate")
@click.argument("source")
@click.option(
    "--kind", type=click.Choice(["chat", "completion", "eval"]), help="Default: from the rows."
)
@click.option("--model", help="Count tokens for this model ('local': the bundled SmolLM2).")
@click.option("--max-tokens", type=int, help="Context window to check rows against.")
@click.option("--tokenizer", "tokenizer_path", help="A tokenizer.json (or .gguf) to count with.")
@click.option("--training/--no-training", default=True, help="Chat rows must end on assistant.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Write an HTML report.")
@click.option(
    "--fail-on",
    type=click.Choice(["error", "warning"]),
    default="error",
    show_default=True,
    help="Exit 1 on findings at this level or worse.",
)
@click.option("--config", default=None, help="keel.yaml [default: ./keel.yaml if present].")
def validate_command(
    source: str,
    kind: str | None,
    model: str | None,
    max_tokens: int | None,
    tokenizer_path: str | None,
    training: bool,
    as_json: bool,
    html_path: str | None,
    fail_on: str,
    config: str | None,
) -> None:
    """Validate a dataset: SOURCE is a .jsonl/.csv/.parquet file or a dataset ref.

    Exit 0 when clean, 1 on findings at --fail-on level, 2 on unreadable input.
    """
    from keel.config import load_settings
    from keel.data.checks import validate

    try:
        settings = load_settings(config)
        path = Path(source)
        store = version = None
        if path.is_file():
            stored_kind, rows = None, read_file(path)
        elif path.suffix.lower() in READERS or path.exists():
            raise InvalidRequest(f"{source}: no such file")
        else:
            stored_kind, rows, store, version = _open_ref(source, config)
        first, rows = _peek(iter(rows))
        kind = kind or stored_kind or (guess_kind(first) if first is not None else "chat")
        tl = {"model": model, "max_tokens": max_tokens, "tokenizer_path": tokenizer_path}
        options = {
            "token_length": {k: v for k, v in tl.items() if v is not None},
            "chat_format": {"training": training},
            "near_duplicates": {"threshold": settings.data.near_duplicate_threshold},
            "pii": {"patterns": settings.redaction.patterns},
        }
        report = validate(
            rows,
            kind,
            options=options,
            user_checks=settings.data.checks,
            progress=sys.stderr.isatty() and not as_json,
        )
    except KeelError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        click.echo(f"error: {source}: {e.strerror or e}", err=True)
        sys.exit(2)
    if as_json:
        try:
            click.echo(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2).decode())
        except TypeError:  # a user check's example holds a lone surrogate
            click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        click.echo(report.to_text())
    if store is not None and version is not None:
        # The version keeps the summary of its latest validation (shown by `keel data show`
        # and /api/datasets).
        summary = {
            "ok": report.ok,
            "rows": report.rows,
            "checks": {r.name: {"severity": r.severity, "count": r.count} for r in report.results},
        }
        try:
            store.set_validation(version.id, summary)
        except Exception as e:  # the report was printed; storing it is a bonus
            click.echo(f"warning: could not store the report on {version.id[:12]}: {e}", err=True)
    if html_path:
        Path(html_path).write_text(report.to_html(), encoding="utf-8", errors="replace")
        if not as_json:
            click.echo(f"HTML report: {html_path}")
    sys.exit(1 if report.failures(fail_on) else 0)
