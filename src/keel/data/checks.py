"""Dataset validation: small streaming checks run together in one pass.

A check is one registered class (:func:`register_check`). :func:`validate`
feeds every row once to every check that applies to the dataset's kind and
collects a :class:`Report`: per check a severity, a count of offending rows,
at most five examples and details. User checks are plain functions named as
``'module:function'`` (``data.checks`` in keel.yaml) or published under the
``keel.data_checks`` entry-point group.

Rows are the canonical rows of the dataset import: ``chat`` (``messages``),
``completion`` (``prompt``/``completion``) and ``eval`` (``input``/``expected``),
each with ``metadata`` and ``split``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import itertools
import os
import re
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import orjson

from keel.errors import InvalidRequest

KINDS = ("chat", "completion", "eval")
MAX_EXAMPLES = 5
ENTRY_POINT_GROUP = "keel.data_checks"


# -- results -------------------------------------------------------------------


@dataclass
class CheckResult:
    """What one check found: ``count`` offending rows, ≤ 5 ``examples``
    (``{"row": index, "reason": …}``) and free-form ``details``."""

    name: str
    severity: str
    count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def failed(self) -> bool:
        return self.count > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "severity": self.severity,
            "count": self.count,
            "examples": self.examples,
            "details": self.details,
            "description": self.description,
        }


_MARK = {"ok": "✓", "error": "✗", "warning": "!"}


@dataclass
class Report:
    """The outcome of :func:`validate`. ``ok`` is False when an error-severity
    check found something."""

    kind: str
    rows: int
    results: list[CheckResult]

    @property
    def ok(self) -> bool:
        return not self.failures("error")

    def failures(self, level: str = "error") -> list[CheckResult]:
        """Results with findings at ``level`` or worse (``warning`` includes errors)."""
        levels = {"error"} if level == "error" else {"error", "warning"}
        return [r for r in self.results if r.count and r.severity in levels]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "kind": self.kind,
            "rows": self.rows,
            "errors": len(self.failures("error")),
            "warnings": len(self.failures("warning")) - len(self.failures("error")),
            "results": [r.to_dict() for r in self.results],
        }

    def to_text(self) -> str:
        errors = len(self.failures("error"))
        warnings = len(self.failures("warning")) - errors
        head = "PASSED" if self.ok else "FAILED"
        lines = [
            f"Validation of {self.rows:,} {self.kind} rows: {head} "
            f"({errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)})"
        ]
        width = max([len(r.name) for r in self.results] + [4])
        for r in self.results:
            mark = _MARK[r.severity] if r.count else _MARK["ok"]
            sev = r.severity if r.count else ""
            summary = _summary(r)
            lines.append(f"{mark} {r.name:<{width}}  {sev:<7}  {r.count:>8,}  {summary}".rstrip())
            for ex in r.examples if r.count else ():
                where = f"row {ex['row']}" if ex.get("row") is not None else "-"
                lines.append(f"    {where}: {ex.get('reason', '')}")
        return "\n".join(lines)

    def to_html(self) -> str:
        import jinja2

        env = jinja2.Environment(autoescape=True)
        return env.from_string(_HTML).render(report=self, mark=_MARK, summary=_summary)


def _summary(r: CheckResult) -> str:
    d = r.details
    if r.name == "pii" and d.get("by_kind"):
        return ", ".join(f"{k.lower()}: {v}" for k, v in sorted(d["by_kind"].items()))
    if r.name == "token_length" and "tokenizer" in d:
        est = " (estimated)" if d.get("estimated") else ""
        limit = f"max {d['max_tokens']}" if d.get("max_tokens") else "no limit given"
        return f"{limit}, longest {d.get('longest_tokens')} tokens; {d['tokenizer']}{est}"
    if r.name == "near_duplicates" and d.get("clusters"):
        return f"{d['clusters']} clusters"
    if r.name == "label_balance" and d.get("classes"):
        return ", ".join(f"{k}: {v}" for k, v in list(d["classes"].items())[:6])
    if "error" in d:
        return str(d["error"])
    return r.description


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Keel data validation: {{ report.kind }}</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:.4em;
text-align:left;vertical-align:top}.error{color:#b00020}.warning{color:#a66300}.ok{color:#137333}
code{background:#f4f4f4;padding:0 .2em}ul{margin:0;padding-left:1.2em}
</style></head><body>
<h1>Data validation: <span class="{{ 'ok' if report.ok else 'error' }}">
{{ 'passed' if report.ok else 'failed' }}</span></h1>
<p>{{ report.rows }} {{ report.kind }} rows.</p>
<table><thead><tr><th></th><th>check</th><th>severity</th><th>count</th><th>examples</th>
</tr></thead><tbody>
{% for r in report.results %}
{% set cls = r.severity if r.count else 'ok' %}
<tr id="check-{{ r.name }}">
<td class="{{ cls }}">{{ mark[r.severity] if r.count else mark.ok }}</td>
<td><code>{{ r.name }}</code><br><small>{{ summary(r) }}</small></td>
<td class="{{ cls }}">{{ r.severity }}</td><td>{{ r.count }}</td>
<td><ul>{% for ex in r.examples %}<li>row {{ ex.row }}: {{ ex.reason }}</li>{% endfor %}</ul></td>
</tr>
{% endfor %}
</tbody></table></body></html>
"""


# -- row helpers -------------------------------------------------------------


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts: only the text ones count
        return "\n".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _walk_strings(obj: Any, out: list[str]) -> None:
    if isinstance(obj, str):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _walk_strings(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _walk_strings(v, out)


def row_strings(kind: str, row: dict[str, Any]) -> list[str]:
    """The text a row carries (message contents, prompt/completion, input/expected)."""
    if kind == "chat":
        msgs = row.get("messages")
        if not isinstance(msgs, list):
            return []
        return [_content_text(m.get("content")) if isinstance(m, dict) else str(m) for m in msgs]
    out: list[str] = []
    if kind == "completion":
        _walk_strings([row.get("prompt"), row.get("completion")], out)
    else:
        _walk_strings([row.get("input"), row.get("expected")], out)
    return out


def _canon(v: Any) -> str:
    if isinstance(v, str):
        return v
    try:
        return orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return repr(v)


def canonical_text(kind: str, row: dict[str, Any]) -> str:
    """The text two rows must share to be exact duplicates."""
    if kind == "chat":
        msgs = row.get("messages")
        if not isinstance(msgs, list):
            return _canon(msgs)
        return "\n".join(
            f"{m.get('role')}: {_content_text(m.get('content'))}"
            if isinstance(m, dict)
            else _canon(m)
            for m in msgs
        )
    if kind == "completion":
        return f"{_canon(row.get('prompt'))}\n\n{_canon(row.get('completion'))}"
    return f"{_canon(row.get('input'))}\n\n{_canon(row.get('expected'))}"


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class Context:
    """What a check receives: the dataset kind, its own options, and per-row
    values computed once and shared by the checks (text, digest)."""

    def __init__(self, kind: str, options: dict[str, Any] | None = None) -> None:
        self.kind = kind
        self.all_options = options or {}
        self.options: dict[str, Any] = {}
        self._shared = self
        self._set_row(-1, {})

    def for_check(self, name: str) -> Context:
        c = Context.__new__(Context)
        c.kind = self.kind
        c.all_options = self.all_options
        c.options = dict(self.all_options.get(name) or {})
        c._shared = self
        return c

    def _set_row(self, i: int, row: dict[str, Any]) -> None:
        self._strings: list[str] | None = None
        self._plain: str | None = None
        self._text: str | None = None
        self._digest: bytes | None = None

    def strings(self, row: dict[str, Any]) -> list[str]:
        sh = self._shared
        if sh._strings is None:
            sh._strings = row_strings(self.kind, row)
        return sh._strings

    def plain(self, row: dict[str, Any]) -> str:
        """All the row's text joined by newlines."""
        sh = self._shared
        if sh._plain is None:
            sh._plain = "\n".join(self.strings(row))
        return sh._plain

    def text(self, row: dict[str, Any]) -> str:
        sh = self._shared
        if sh._text is None:
            sh._text = canonical_text(self.kind, row)
        return sh._text

    def digest(self, row: dict[str, Any]) -> bytes:
        sh = self._shared
        if sh._digest is None:
            sh._digest = _digest(self.text(row))
        return sh._digest


# -- the check contract and registry ------------------------------------------


class Check:
    """One validation check. Subclass, set the class attributes, implement
    ``feed`` (called once per row, in order) and ``finish``."""

    name: ClassVar[str] = ""
    severity: ClassVar[str] = "error"
    description: ClassVar[str] = ""
    applies_to: ClassVar[tuple[str, ...]] = KINDS

    def start(self, ctx: Context) -> None:
        self.ctx = ctx
        self.count = 0
        self.examples: list[dict[str, Any]] = []

    def feed(self, i: int, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def finish(self) -> CheckResult:
        return self.result()

    # helpers
    def flag(self, i: int, reason: str, **extra: Any) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"row": i, "reason": reason, **extra})

    def result(self, **details: Any) -> CheckResult:
        return CheckResult(
            self.name,
            self.ctx.options.get("severity", self.severity),
            self.count,
            self.examples,
            details,
            self.description,
        )


CHECKS: dict[str, type[Check]] = {}


def register_check(cls: type[Check]) -> type[Check]:
    """Class decorator: make a check run in :func:`validate` (by its ``name``)."""
    if not cls.name or cls.severity not in ("error", "warning"):
        raise ValueError(f"{cls.__name__}: a check needs a name and severity error|warning")
    CHECKS[cls.name] = cls
    return cls


# -- built-in checks -----------------------------------------------------------

_ROLES = {"system", "developer", "user", "assistant", "tool"}
_HOLDOUT = {"validation", "valid", "val", "dev", "test", "eval", "holdout"}


@register_check
class SchemaCheck(Check):
    name = "schema"
    description = "required fields and types per kind"

    def feed(self, i: int, row: dict[str, Any]) -> None:
        problem = self._problem(row)
        if problem:
            self.flag(i, problem)

    def _problem(self, row: Any) -> str | None:
        if not isinstance(row, dict):
            return f"row is a {type(row).__name__}, not an object"
        kind = self.ctx.kind
        if kind == "chat":
            msgs = row.get("messages")
            if not isinstance(msgs, list) or not msgs:
                return "messages must be a non-empty list"
            for j, m in enumerate(msgs):
                if not isinstance(m, dict):
                    return f"messages[{j}] must be an object"
                if not isinstance(m.get("role"), str):
                    return f"messages[{j}].role must be a string"
                c = m.get("content")
                if c is None and not m.get("tool_calls"):
                    return f"messages[{j}].content is missing"
                if c is not None and not isinstance(c, str | list):
                    return f"messages[{j}].content must be a string or a list of parts"
        elif kind == "completion":
            for f in ("prompt", "completion"):
                if not isinstance(row.get(f), str):
                    return f"{f} must be a string"
        else:
            if not isinstance(row.get("input"), str | dict):
                return "input must be a string or an object"
            if row.get("expected") is not None and not isinstance(row["expected"], str | dict):
                return "expected must be a string, an object or null"
        if row.get("metadata") is not None and not isinstance(row["metadata"], dict):
            return "metadata must be an object"
        if row.get("split") is not None and not isinstance(row["split"], str):
            return "split must be a string or null"
        return None


@register_check
class ChatFormatCheck(Check):
    name = "chat_format"
    description = "roles, turn order, final assistant turn (training)"
    applies_to = ("chat",)

    def start(self, ctx: Context) -> None:
        super().start(ctx)
        self.training = bool(ctx.options.get("training", True))

    def feed(self, i: int, row: dict[str, Any]) -> None:
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            return  # the schema check reports it
        problem = self._problem(msgs)
        if problem:
            self.flag(i, problem)

    def _problem(self, msgs: list[dict[str, Any]]) -> str | None:
        prev = None
        seen_turn = False
        for j, m in enumerate(msgs):
            role = m.get("role")
            if role not in _ROLES:
                return f"messages[{j}]: invalid role {role!r}"
            if role in ("system", "developer"):
                if seen_turn:
                    return f"messages[{j}]: {role} message after the conversation started"
                continue
            if not seen_turn and role != "user":
                return f"messages[{j}]: the first turn is {role!r}, not 'user'"
            seen_turn = True
            if role == prev and role in ("user", "assistant"):
                return f"messages[{j}]: two {role} turns in a row"
            if role == "tool" and not (
                prev == "tool" or (prev == "assistant" and msgs[j - 1].get("tool_calls"))
            ):
                return f"messages[{j}]: tool message not after an assistant tool call"
            prev = role
        if not seen_turn:
            return "no user turn"
        if self.training and prev != "assistant":
            return f"the last turn is {prev!r}: training data must end with an assistant turn"
        return None


@register_check
class EmptyFieldsCheck(Check):
    name = "empty_fields"
    description = "empty or whitespace-only fields"

    def feed(self, i: int, row: dict[str, Any]) -> None:
        if not isinstance(row, dict):
            return
        kind = self.ctx.kind
        if kind == "chat":
            msgs = row.get("messages")
            if not isinstance(msgs, list):
                return
            for j, m in enumerate(msgs):
                if not isinstance(m, dict):
                    continue
                c = m.get("content")
                if c is None and m.get("tool_calls"):
                    continue
                if isinstance(c, str | list | type(None)) and not _content_text(c).strip():
                    self.flag(i, f"messages[{j}].content ({m.get('role')}) is empty")
                    return
            return
        fields = ("prompt", "completion") if kind == "completion" else ("input", "expected")
        for f in fields:
            v = row.get(f)
            if f == "expected" and v is None:
                continue
            if (isinstance(v, str) and not v.strip()) or (isinstance(v, dict) and not v):
                self.flag(i, f"{f} is empty")
                return


_BAD_UTF8 = re.compile("[\ud800-\udfff\ufffd]")


@register_check
class InvalidUtf8Check(Check):
    name = "invalid_utf8"
    description = "lone surrogates, U+FFFD or undecodable bytes"

    def feed(self, i: int, row: dict[str, Any]) -> None:
        if not isinstance(row, dict):
            return
        text = self.ctx.text(row)
        if text.isascii():
            return
        m = _BAD_UTF8.search(text)
        if m is None:
            for v in row.values():  # raw bytes from a reader that kept them
                if isinstance(v, bytes):
                    try:
                        v.decode()
                    except UnicodeDecodeError:
                        self.flag(i, "undecodable bytes")
                        return
            return
        ch = m.group()
        what = (
            "U+FFFD replacement character (text was decoded lossily)"
            if ch == "\ufffd"
            else f"lone surrogate U+{ord(ch):04X} (invalid UTF-8 or a broken escape)"
        )
        self.flag(i, f"{what} at offset {m.start()}")


# -- token counting -------------------------------------------------------------
#
# Tokenizer resolution (first that applies):
#   1. model "local" (or tokenizer_path ending in .gguf): llama.cpp's tokenizer
#      from the bundled SmolLM2 GGUF, loaded with vocab_only (no weights);
#   2. tokenizer_path: a Hugging Face tokenizer.json, run by `tokenizers`;
#   3. tiktoken, when it is installed and the model's encoding is already in its
#      local cache (it would otherwise try to download it);
#   4. an estimate of one token per 4 characters (details say "estimated").

# Known context windows by model-name prefix (longest prefix wins).
CONTEXT_WINDOWS = {
    "gpt-4o": 128_000, "gpt-4.1": 1_047_576, "gpt-4-turbo": 128_000, "gpt-4": 8_192,
    "gpt-3.5-turbo": 16_385, "o1": 200_000, "o3": 200_000, "o4": 200_000, "gpt-5": 400_000,
    "claude": 200_000, "llama-3": 8_192, "llama-3.1": 131_072, "mistral": 32_768,
    "qwen2": 32_768, "gemma": 8_192,
}  # fmt: skip
_CHUNK = re.compile(r"\s*\S+|\s+")
_TIKTOKEN_URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}


class _Estimate:
    name = "estimate (chars/4)"
    estimated = True
    context_window: int | None = None

    def overhead(self, role: str) -> int:
        return 4  # role and separators, as OpenAI counts chat messages

    def count_batch(self, texts: list[str]) -> list[int]:
        return [(len(t) + 3) // 4 for t in texts]


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    saved = os.dup(fd)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr.flush()
        os.dup2(null, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(null)


class _LlamaTokens(_Estimate):
    """llama.cpp's tokenizer. For byte-level BPE vocabularies the text is cut
    where every pre-tokenizer cuts too (before whitespace that follows a
    non-space: no pre-token spans it), so counts per piece add up exactly and
    each distinct piece is tokenized once; that memo is what makes it fast."""

    estimated = False

    def __init__(self, path: Path) -> None:
        import llama_cpp

        with _quiet_stderr():  # llama.cpp logs a context-size warning in C
            self.llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        meta = self.llm.metadata
        self.name = f"llama.cpp ({path.name})"
        arch = meta.get("general.architecture", "llama")
        ctx = meta.get(f"{arch}.context_length")
        self.context_window = int(ctx) if ctx else None
        self._bpe = meta.get("tokenizer.ggml.model") == "gpt2"
        self._chatml = "<|im_start|>" in meta.get("tokenizer.chat_template", "")
        self._vocab = self.llm._model.vocab
        self._buf = (llama_cpp.llama_token * 1)()
        self._blen: list[int] | None = None
        self._memo: dict[str, int] = {"": 0}
        self._memo_sp: dict[str, int] = {}
        self._over: dict[str, int] = {}

    def _tok(self, text: str, special: bool = False) -> int:
        import llama_cpp

        b = text.encode("utf-8", "replace")
        # A count needs no token list: with a too-small buffer llama_tokenize
        # returns minus the count (Llama.tokenize allocates n_ctx ints per call).
        n = llama_cpp.llama_tokenize(self._vocab, b, len(b), self._buf, 1, False, special)
        return abs(n)

    def overhead(self, role: str) -> int:
        n = self._over.get(role)
        if n is None:
            n = self._tok(f"<|im_start|>{role}\n<|im_end|>\n", True) if self._chatml else 4
            self._over[role] = n
        return n

    def count_batch(self, texts: list[str]) -> list[int]:
        if not self._bpe:
            return [self._tok(t) for t in texts]
        memo = self._memo
        if len(memo) > 2_000_000:
            memo.clear()
            memo[""] = 0
        # Text whose only whitespace is single spaces is cut with str.split (5×
        # faster than the regex): its pieces are the first word and " " + each
        # other word, counted from a memo keyed by the bare word.
        sp = self._memo_sp
        if len(sp) > 2_000_000:
            sp.clear()
        pieces: list[tuple[bool, list[str]]] = []
        unseen: set[str] = set()
        unseen_sp: set[str] = set()
        has, has_sp = memo.__contains__, sp.__contains__
        for t in texts:
            if t.isprintable() and "  " not in t:
                words = t.split(" ")
                pieces.append((True, words))
                if words[0] not in memo:
                    unseen.add(words[0])
                unseen_sp.update(itertools.filterfalse(has_sp, words[1:]))
            else:
                pcs = _CHUNK.findall(t)
                pieces.append((False, pcs))
                unseen.update(itertools.filterfalse(has, pcs))
        if unseen_sp:
            spaced = [" " + w for w in unseen_sp]
            self._learn(set(spaced) - memo.keys())
            for w, p in zip(unseen_sp, spaced, strict=True):
                sp[w] = memo[p]
        if unseen:
            self._learn(unseen)
        get, get_sp = memo.__getitem__, sp.__getitem__
        return [
            get(pcs[0]) + sum(map(get_sp, pcs[1:])) if split else sum(map(get, pcs))
            for split, pcs in pieces
        ]

    def _learn(self, unseen: set[str]) -> None:
        """Count new pieces: those that start with whitespace back to back in
        one tokenizer call (each starts where a pre-token must start), cut
        apart by the byte length of each token; the rest one by one."""
        import llama_cpp

        memo = self._memo
        joinable = []
        for p in unseen:
            if p[0].isspace():
                joinable.append(p)
            else:
                memo[p] = self._tok(p)
        if not joinable:
            return
        if self._blen is None:
            buf = ctypes.create_string_buffer(256)
            n = llama_cpp.llama_vocab_n_tokens(self._vocab)
            self._blen = [
                abs(llama_cpp.llama_token_to_piece(self._vocab, t, buf, 256, 0, False))
                for t in range(n)
            ]
        blen = self._blen
        for s in range(0, len(joinable), 2048):
            group = joinable[s : s + 2048]
            enc = [p.encode("utf-8", "replace") for p in group]
            data = b"".join(enc)
            out = (llama_cpp.llama_token * (len(data) + 8))()
            n = llama_cpp.llama_tokenize(
                self._vocab, data, len(data), out, len(data) + 8, False, False
            )
            ends = list(itertools.accumulate(map(len, enc)))
            res = [-1] * len(group)
            k = pos = c = 0
            bad = False
            last = len(group)
            for tok in out[: max(n, 0)]:
                pos += blen[tok]
                c += 1
                while k < last and pos >= ends[k]:
                    res[k] = c if pos == ends[k] and not bad else -1
                    bad = pos > ends[k]
                    c = 0
                    k += 1
            for p, r in zip(group, res, strict=True):
                memo[p] = r if r >= 0 else self._tok(p)


class _HFTokens(_Estimate):
    estimated = False

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.name = f"tokenizers ({path.name})"

    def count_batch(self, texts: list[str]) -> list[int]:
        enc = self.tok.encode_batch(
            [t.encode("utf-8", "replace").decode() for t in texts], add_special_tokens=False
        )
        return [len(e.ids) for e in enc]


class _TiktokenTokens(_Estimate):
    estimated = False

    def __init__(self, enc: Any) -> None:
        self.enc = enc
        self.name = f"tiktoken ({enc.name})"

    def count_batch(self, texts: list[str]) -> list[int]:
        safe = [t.encode("utf-8", "replace").decode() for t in texts]
        return [len(x) for x in self.enc.encode_ordinary_batch(safe, num_threads=1)]


def _tiktoken_for(model: str | None) -> Any | None:
    """tiktoken's encoding for ``model`` when it needs no download, else None."""
    try:
        import tiktoken
        from tiktoken.model import encoding_name_for_model
    except ImportError:
        return None
    import tempfile

    try:
        name = encoding_name_for_model(model or "")
    except KeyError:
        name = "o200k_base"
    url = _TIKTOKEN_URLS.get(name)
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    cache = cache or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if url is None or not (Path(cache) / hashlib.sha1(url.encode()).hexdigest()).is_file():
        return None
    try:
        return tiktoken.get_encoding(name)
    except Exception:
        return None


def resolve_tokenizer(model: str | None = None, tokenizer_path: str | None = None) -> _Estimate:
    """The token counter for ``model``, in the order documented above."""
    if model == "local" or (tokenizer_path and tokenizer_path.endswith(".gguf")):
        if tokenizer_path and tokenizer_path.endswith(".gguf"):
            path: Path | None = Path(tokenizer_path)
        else:
            from keel.gateway.providers.local import bundled_model_paths

            path = bundled_model_paths()[0]
        try:
            if path is not None:
                return _LlamaTokens(path)
        except ImportError:
            pass
    if tokenizer_path:
        try:
            return _HFTokens(Path(tokenizer_path))
        except ImportError:
            pass
        except Exception as e:
            raise InvalidRequest(f"tokenizer {tokenizer_path}: cannot load it: {e}") from None
    enc = _tiktoken_for(model) if model != "local" else None
    return _TiktokenTokens(enc) if enc is not None else _Estimate()


def context_window(model: str | None) -> int | None:
    if not model:
        return None
    m = model.lower().split("/")[-1]
    best = max((p for p in CONTEXT_WINDOWS if m.startswith(p)), key=len, default=None)
    return CONTEXT_WINDOWS[best] if best else None


@register_check
class TokenLengthCheck(Check):
    name = "token_length"
    description = "tokens against the model's context window"

    _BATCH = 1024

    def start(self, ctx: Context) -> None:
        super().start(ctx)
        o = ctx.options
        model = o.get("model")
        self.counter = resolve_tokenizer(model, o.get("tokenizer_path"))
        limit = o.get("max_tokens") or self.counter.context_window or context_window(model)
        if not limit and model:
            raise InvalidRequest(
                f"token_length: the context window of model {model!r} is unknown; "
                "give max_tokens (--max-tokens)"
            )
        # Without a model or a limit, tokens are counted (details) but no row fails.
        self.limit = int(limit) if limit else None
        self.pending: list[tuple[int, int, int]] = []  # (row, first text, text count)
        self.texts: list[str] = []
        self.extra: list[int] = []
        self.total = 0
        self.longest = (0, -1)

    def feed(self, i: int, row: dict[str, Any]) -> None:
        if not isinstance(row, dict):
            return
        kind = self.ctx.kind
        if kind == "chat":
            msgs = row.get("messages")
            if not isinstance(msgs, list):
                return
            over = 3  # the reply primer
            start = len(self.texts)
            for m in msgs:
                if isinstance(m, dict):
                    over += self.counter.overhead(str(m.get("role")))
                    self.texts.append(_content_text(m.get("content")))
            self.pending.append((i, start, len(self.texts) - start))
            self.extra.append(over)
        else:
            self.pending.append((i, len(self.texts), 1))
            self.texts.append(self.ctx.plain(row))
            self.extra.append(0)
        if len(self.pending) >= self._BATCH:
            self._flush()

    def _flush(self) -> None:
        counts = self.counter.count_batch(self.texts)
        limit = self.limit
        for (i, start, n), extra in zip(self.pending, self.extra, strict=True):
            tokens = extra + sum(counts[start : start + n])
            self.total += tokens
            if tokens > self.longest[0]:
                self.longest = (tokens, i)
            if limit is not None and tokens > limit:
                self.flag(i, f"{tokens} tokens > {limit}", tokens=tokens)
        self.pending, self.texts, self.extra = [], [], []

    def finish(self) -> CheckResult:
        self._flush()
        return self.result(
            tokenizer=self.counter.name,
            estimated=self.counter.estimated,
            max_tokens=self.limit,
            total_tokens=self.total,
            longest_row=self.longest[1],
            longest_tokens=self.longest[0],
        )


@register_check
class DuplicatesCheck(Check):
    name = "duplicates"
    severity = "warning"
    description = "exact duplicates (same canonical text)"

    def start(self, ctx: Context) -> None:
        super().start(ctx)
        self.seen: dict[bytes, int] = {}

    def feed(self, i: int, row: dict[str, Any]) -> None:
        first = self.seen.setdefault(self.ctx.digest(row), i)
        if first != i:
            self.flag(i, f"same as row {first}", duplicate_of=first)

    def finish(self) -> CheckResult:
        return self.result(unique_rows=len(self.seen))


# -- near duplicates -----------------------------------------------------------
#
# MinHash over word 3-gram shingles, computed for thousands of rows at once with
# numpy. The signatures are exactly datasketch's: MinHash(num_perm, scheme=
# "affine32", hashfunc=<the shingle hash>) updated with each row's shingles
# gives the same hash values (tested). The LSH banding is datasketch's too
# (MinHashLSH's optimal (bands, rows) for the threshold, weighted towards
# recall because every candidate pair is verified), but the buckets are built
# by sorting band keys in numpy: MinHashLSH keeps a Python set per bucket and
# band, gigabytes and minutes at a million rows.

_W1 = np.uint32(0x9E3779B1)
_W2 = np.uint32(0x85EBCA77)
_FMIX = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35))


def shingle_hashes(word_hashes: np.ndarray) -> np.ndarray:
    """32-bit hashes of the word 3-grams of one row's word hashes (≥ 3 words)."""
    w = word_hashes.astype(np.uint32)
    return w[:-2] * _W1 + w[1:-1] * _W2 + w[2:]


def word_hashes(text: str) -> list[int]:
    """Deterministic 32-bit hashes of the lower-cased words, padded to 3 words."""
    words = text.lower().encode("utf-8", "surrogatepass").split()
    h = list(map(zlib.crc32, words))
    if 0 < len(h) < 3:
        h += [0] * (3 - len(h))
    return h


def _fmix32(h: np.ndarray) -> np.ndarray:
    s1, m1, s2, m2 = _FMIX
    h = h ^ (h >> s1)
    h = h * m1
    h = h ^ (h >> s2)
    h = h * m2
    return h ^ (h >> s1)


class MinHasher:
    """Batched MinHash signatures (rows × num_perm, uint32)."""

    def __init__(self, num_perm: int = 64, seed: int = 1) -> None:
        from datasketch import MinHash

        a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
        self.a = np.asarray(a, dtype=np.uint32)[:, None]
        self.b = np.asarray(b, dtype=np.uint32)[:, None]
        self.num_perm = num_perm

    def signatures(self, hashes: list[int], lengths: list[int]) -> np.ndarray:
        """``hashes``: the word hashes of several rows back to back, ``lengths``
        their word counts (each ≥ 3)."""
        w = np.fromiter(hashes, dtype=np.uint32, count=len(hashes))
        lens = np.asarray(lengths, dtype=np.int64)
        row = np.repeat(np.arange(len(lens)), lens)
        sh = shingle_hashes(w)[row[:-2] == row[2:]]
        offsets = np.concatenate(([0], np.cumsum(lens - 2)[:-1]))
        hv = _fmix32(sh)
        # (num_perm, shingles), wrapping mod 2^32; in place: a fresh temporary
        # of this size costs more in page faults than the arithmetic.
        phv = np.multiply(self.a, hv[None, :])
        phv += self.b
        return np.minimum.reduceat(phv, offsets, axis=1).T.copy()


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.2, 0.8)


def near_duplicate_pairs(
    sigs: np.ndarray, threshold: float, bands: int, rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, similarity) for the verified candidate pairs of the LSH buckets;
    each bucket member is paired with the bucket's first row."""
    n = len(sigs)
    if n < 2:
        e = np.empty(0, dtype=np.int64)
        return e, e, np.empty(0)
    rng = np.random.default_rng(7)
    mult = rng.integers(1, 2**63, size=rows, dtype=np.uint64) | np.uint64(1)
    pairs = []
    for band in range(bands):
        cols = sigs[:, band * rows : (band + 1) * rows].astype(np.uint64)
        with np.errstate(over="ignore"):
            keys = (cols * mult).sum(axis=1, dtype=np.uint64)
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        same = sk[1:] == sk[:-1]
        if not same.any():
            continue
        run_start = np.maximum.accumulate(
            np.where(np.concatenate(([True], ~same)), np.arange(n), 0)
        )
        members = order[1:][same]
        leaders = order[run_start[1:][same]]
        pairs.append(np.minimum(leaders, members) * n + np.maximum(leaders, members))
    if not pairs:
        e = np.empty(0, dtype=np.int64)
        return e, e, np.empty(0)
    uniq = np.unique(np.concatenate(pairs))
    a, b = uniq // n, uniq % n
    sim = np.empty(len(a))
    for s in range(0, len(a), 200_000):  # bounded memory for huge buckets
        sim[s : s + 200_000] = (sigs[a[s : s + 200_000]] == sigs[b[s : s + 200_000]]).mean(axis=1)
    keep = sim >= threshold
    return a[keep], b[keep], sim[keep]


def _clusters(n: int, a: np.ndarray, b: np.ndarray) -> list[list[int]]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    groups: dict[int, list[int]] = {}
    for x in set(a.tolist()) | set(b.tolist()):
        groups.setdefault(find(x), []).append(x)
    return sorted(sorted(g) for g in groups.values())


@register_check
class NearDuplicatesCheck(Check):
    name = "near_duplicates"
    severity = "warning"
    description = "near duplicates (MinHash/LSH over word 3-grams)"

    _BATCH = 4096

    def start(self, ctx: Context) -> None:
        super().start(ctx)
        self.threshold = float(ctx.options.get("threshold", 0.85))
        self.hasher = MinHasher(int(ctx.options.get("num_perm", 128)))
        # Candidates are gathered for a lower threshold and the estimate is then
        # checked with a margin of about one standard error, so pairs just above
        # the threshold are not lost to the estimate's noise (recall over
        # precision for a warning-level check).
        self.margin = float(ctx.options.get("margin", 0.03))
        self.bands, self.rows_per_band = lsh_params(
            max(0.5, self.threshold - 0.1), self.hasher.num_perm
        )
        self.seen: set[bytes] = set()
        self.hbuf: list[int] = []
        self.lbuf: list[int] = []
        self.ibuf: list[int] = []
        self.sigs: list[np.ndarray] = []
        self.index: list[np.ndarray] = []

    def feed(self, i: int, row: dict[str, Any]) -> None:
        d = self.ctx.digest(row)
        if d in self.seen:  # exact duplicates are the duplicates check's
            return
        self.seen.add(d)
        h = word_hashes(self.ctx.plain(row))
        if not h:
            return
        self.hbuf += h
        self.lbuf.append(len(h))
        self.ibuf.append(i)
        if len(self.ibuf) >= self._BATCH:
            self._flush()

    def _flush(self) -> None:
        if self.ibuf:
            self.sigs.append(self.hasher.signatures(self.hbuf, self.lbuf))
            self.index.append(np.asarray(self.ibuf, dtype=np.int64))
        self.hbuf, self.lbuf, self.ibuf = [], [], []

    def finish(self) -> CheckResult:
        self._flush()
        details: dict[str, Any] = {
            "threshold": self.threshold,
            "num_perm": self.hasher.num_perm,
            "bands": self.bands,
            "rows_per_band": self.rows_per_band,
            "clusters": 0,
        }
        if not self.sigs:
            return self.result(**details)
        sigs = np.concatenate(self.sigs)
        index = np.concatenate(self.index)
        self.sigs = []
        a, b, sim = near_duplicate_pairs(
            sigs, self.threshold - self.margin, self.bands, self.rows_per_band
        )
        best = {}
        for x, y, s in zip(a.tolist(), b.tolist(), sim.tolist(), strict=True):
            best[y] = (x, s) if y not in best or s > best[y][1] else best[y]
        clusters = [[int(index[k]) for k in g] for g in _clusters(len(sigs), a, b)]
        for g in clusters:
            self.count += len(g) - 1
        for g in clusters[:MAX_EXAMPLES]:
            pos = int(np.searchsorted(index, g[1]))
            x, s = best.get(pos, (None, self.threshold))
            of = int(index[x]) if x is not None else g[0]
            self.examples.append(
                {
                    "row": g[1],
                    "reason": f"near-duplicate of row {of} (similarity ≈ {s:.2f}); "
                    f"cluster of {len(g)}",
                    "cluster": g[:20],
                }
            )
        details["clusters"] = len(clusters)
        details["largest_cluster"] = max(len(g) for g in clusters) if clusters else 0
        if self.ctx.options.get("all_clusters"):
            details["all_clusters"] = clusters
        return self.result(**details)


def _split_side(split: Any) -> str | None:
    if not isinstance(split, str):
        return None
    s = split.strip().lower()
    if s in ("train", "training"):
        return "train"
    return s if s in _HOLDOUT else None


@register_check
class LeakageCheck(Check):
    name = "leakage"
    description = "train inputs that reappear in validation/test"

    def start(self, ctx: Context) -> None:
        super().start(ctx)
        self.train: dict[bytes, int] = {}
        self.holdout: list[tuple[int, bytes, str]] = []

    def _key(self, row: dict[str, Any]) -> bytes:
        kind = self.ctx.kind
        if kind == "chat":
            msgs = row.get("messages")
            text = (
                "\n".join(
                    _content_text(m.get("content"))
                    for m in msgs
                    if isinstance(m, dict) and m.get("role") == "user"
                )
                if isinstance(msgs, list)
                else ""
            )
        elif kind == "completion":
            text = _canon(row.get("prompt"))
        else:
            text = _canon(row.get("input"))
        return _digest(text)

    def feed(self, i: int, row: dict[str, Any]) -> None:
        side = _split_side(row.get("split"))
        if side is None:
            return
        key = self._key(row)
        if side == "train":
            self.train.setdefault(key, i)
        else:
            self.holdout.append((i, key, side))

    def finish(self) -> CheckResult:
        splits: Counter[str] = Counter()
        for i, key, side in self.holdout:
            t = self.train.get(key)
            if t is not None:
                splits[side] += 1
                what = "user turns" if self.ctx.kind == "chat" else "input"
                self.flag(i, f"{side} row: its {what} also in train (row {t})", train_row=t)
        return self.result(
            train_rows=len(self.train), holdout_rows=len(self.holdout), by_split=dict(splits)
        )


@register_check
class PiiCheck(Check):
    name = "pii"
    severity = "warning"
    description = "personal data (the gateway's redaction detectors)"

    def start(self, ctx: Context) -> None:
        super().start(ctx)
        from keel.gateway.redact import Redactor

        self.redactor = Redactor(ctx.options.get("patterns") or None)
        self.by_kind: Counter[str] = Counter()

    def feed(self, i: int, row: dict[str, Any]) -> None:
        found = self.redactor.detect(self.ctx.plain(row))
        if found:
            self.by_kind.update(found)
            self.flag(i, ", ".join(f"{k} ×{v}" for k, v in sorted(found.items())), kinds=found)

    def finish(self) -> CheckResult:
        return self.result(by_kind=dict(self.by_kind))


@register_check
class LabelBalanceCheck(Check):
    name = "label_balance"
    severity = "warning"
    description = "class balance of classification-style labels"

    def start(self, ctx: Context) -> None:
        super().start(ctx)
        self.labels: Counter[str] = Counter()
        self.rows: dict[str, list[int]] = {}
        self.explicit = 0
        self.implicit_ok = True
        self.ratio = float(ctx.options.get("min_ratio", 0.1))

    def feed(self, i: int, row: dict[str, Any]) -> None:
        md = row.get("metadata")
        exp = row.get("expected")
        label: Any = None
        if isinstance(md, dict) and md.get("label") is not None:
            label, self.explicit = md["label"], self.explicit + 1
        elif isinstance(exp, dict) and exp.get("label") is not None:
            label, self.explicit = exp["label"], self.explicit + 1
        elif self.ctx.kind == "eval" and isinstance(exp, str):
            label = exp.strip()
            if len(label) > 40 or "\n" in label:
                self.implicit_ok = False
        if label is None:
            return
        label = _canon(label)
        self.labels[label] += 1
        seen = self.rows.setdefault(label, [])
        if len(seen) < MAX_EXAMPLES:
            seen.append(i)

    def finish(self) -> CheckResult:
        n = sum(self.labels.values())
        classes = dict(self.labels.most_common())
        if not n:
            return self.result(labeled_rows=0, classes={})
        implicit = not self.explicit
        if len(classes) > 50 or (implicit and (not self.implicit_ok or n < 2 * len(classes))):
            return self.result(labeled_rows=n, classes={}, skipped="not classification-style")
        top = max(classes.values())
        if len(classes) < 2:
            only = next(iter(classes))
            self.flag(self.rows[only][0], f"only one class: {only!r}")
        else:
            for label, c in classes.items():
                if c < self.ratio * top:
                    self.count += 1
                    for r in self.rows[label][: MAX_EXAMPLES - len(self.examples)]:
                        self.examples.append(
                            {
                                "row": r,
                                "reason": f"class {label!r}: {c} rows vs {top} (most common)",
                            }
                        )
        return self.result(labeled_rows=n, classes=classes, min_ratio=self.ratio)


# -- user checks ---------------------------------------------------------------


def _import_ref(ref: str) -> Any:
    mod, _, attr = ref.partition(":")
    if not mod or not attr:
        raise ValueError(f"{ref!r} is not 'module:function'")
    obj: Any = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _user_result(name: str, out: Any) -> CheckResult:
    if isinstance(out, CheckResult):
        return out
    if out is None:
        return CheckResult(name, "error", description="user check")
    if isinstance(out, int) and not isinstance(out, bool):
        return CheckResult(name, "error", count=out, description="user check")
    if not isinstance(out, dict):
        raise TypeError(f"returned a {type(out).__name__}, not a dict")
    sev = out.get("severity", "error")
    if sev not in ("error", "warning"):
        raise ValueError(f"severity {sev!r} is not error|warning")
    examples = list(out.get("examples") or [])
    return CheckResult(
        str(out.get("name") or name),
        sev,
        int(out.get("count", len(examples))),
        examples[:MAX_EXAMPLES],
        dict(out.get("details") or {}),
        str(out.get("description") or "user check"),
    )


def _crashed(name: str, e: BaseException, where: str = "") -> CheckResult:
    msg = f"{where}{type(e).__name__}: {e}"
    return CheckResult(
        name, "error", 1, [{"row": None, "reason": f"check failed: {msg}"}], {"error": msg},
        "user check",
    )  # fmt: skip


def load_user_checks(refs: Iterable[str] = ()) -> tuple[list[tuple[str, Any]], list[CheckResult]]:
    """The user checks from 'module:function' refs and the entry-point group:
    ([(name, function or Check instance)], [error results for those that failed to load])."""
    found: list[tuple[str, Any]] = []
    failed: list[CheckResult] = []
    for ref in refs:
        try:
            found.append((ref, _import_ref(ref)))
        except Exception as e:
            failed.append(_crashed(ref, e, "cannot load: "))
    for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            found.append((ep.name, ep.load()))
        except Exception as e:
            failed.append(_crashed(ep.name, e, "cannot load: "))
    return found, failed


# -- the pass ------------------------------------------------------------------


def _rows_with_progress(rows: Iterable[Any], progress: bool) -> Iterator[Any]:
    if not progress:
        return iter(rows)
    from tqdm import tqdm

    return iter(tqdm(rows, desc="validate", unit=" rows", unit_scale=True, smoothing=0.1))


def validate(
    rows: Iterable[dict[str, Any]],
    kind: str,
    *,
    options: dict[str, Any] | None = None,
    user_checks: Iterable[str] = (),
    progress: bool = False,
) -> Report:
    """Run every check that applies to ``kind`` over ``rows`` in one pass.

    ``options`` maps a check name to its options (``{"token_length": {"model":
    "local"}, "near_duplicates": {"threshold": 0.9}}``; any check also takes
    ``severity``); ``"only"``/``"skip"`` list check names to run or leave out.
    ``user_checks`` are 'module:function' refs; with the ``keel.data_checks``
    entry points they are called as ``fn(kind, rows)`` after the pass, on the
    rows kept in memory, and return ``{"count", "examples", "severity",
    "details"}`` (or None when clean). A user check that raises is reported as
    an error result.
    """
    if kind not in KINDS:
        raise InvalidRequest(f"unknown dataset kind {kind!r}; use one of {', '.join(KINDS)}")
    options = dict(options or {})
    only = set(options.get("only") or CHECKS)
    skip = set(options.get("skip") or ())
    unknown = (only | skip) - set(CHECKS)
    if unknown:
        raise InvalidRequest(f"unknown check(s): {', '.join(sorted(unknown))}")
    ctx = Context(kind, options)
    checks: list[Check] = [
        cls() for name, cls in CHECKS.items() if kind in cls.applies_to and name in only - skip
    ]
    user, results_extra = load_user_checks(user_checks)
    user_fns = []
    for name, obj in user:
        if isinstance(obj, type) and issubclass(obj, Check):
            if kind in obj.applies_to:
                checks.append(obj())
        else:
            user_fns.append((name, obj))
    for c in checks:
        c.start(ctx.for_check(c.name))
    crashed: dict[str, CheckResult] = {}
    kept: list[Any] | None = [] if user_fns else None
    schema = next((c for c in checks if c.name == "schema"), None)
    active = list(checks)
    n = 0
    for i, row in enumerate(_rows_with_progress(rows, progress)):
        n = i + 1
        if kept is not None:
            kept.append(row)
        if not isinstance(row, dict):
            if schema is not None:
                schema.feed(i, row)
            continue
        ctx._set_row(i, row)
        for c in active:
            try:
                c.feed(i, row)
            except Exception as e:  # a check must never take the whole run down
                crashed[c.name] = _crashed(c.name, e, f"at row {i}: ")
                active = [a for a in active if a is not c]
    results = []
    for c in checks:
        if c.name in crashed:
            results.append(crashed[c.name])
            continue
        try:
            results.append(c.finish())
        except Exception as e:
            results.append(_crashed(c.name, e))
    for name, fn in user_fns:
        try:
            results.append(_user_result(name, fn(kind, kept)))
        except Exception as e:
            results.append(_crashed(name, e))
    return Report(kind, n, results + results_extra)
