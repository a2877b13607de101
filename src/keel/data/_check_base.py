"""The check contract shared by every validation check: row helpers, the
per-row :class:`Context`, the :class:`Check` base class and its registry."""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import orjson

from keel.data.report import CheckResult

KINDS = ("chat", "completion", "eval")
MAX_EXAMPLES = 5


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


_UNSET: Any = object()


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
        self._chat: Any = _UNSET
        self._strings: list[str] | None = None
        self._plain: str | None = None
        self._text: str | None = None
        self._digest: bytes | None = None

    def chat(self, row: dict[str, Any]) -> tuple[list[Any], list[str]] | None:
        """(roles, content texts) of a chat row whose messages are a list of
        objects only; None otherwise (and for the other kinds)."""
        sh = self._shared
        parts = sh._chat
        if parts is _UNSET:
            parts = None
            if self.kind == "chat":
                msgs = row.get("messages")
                if type(msgs) is list and all(type(m) is dict for m in msgs):
                    roles = [m.get("role") for m in msgs]
                    texts = []
                    for m in msgs:
                        c = m.get("content")
                        texts.append(c if type(c) is str else _content_text(c))
                    parts = (roles, texts)
            sh._chat = parts
        return parts

    def strings(self, row: dict[str, Any]) -> list[str]:
        sh = self._shared
        if sh._strings is None:
            parts = self.chat(row)
            sh._strings = parts[1] if parts is not None else row_strings(self.kind, row)
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
            parts = self.chat(row)
            if parts is not None:
                sh._text = "\n".join([f"{r}: {t}" for r, t in zip(*parts, strict=True)])
            else:
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
