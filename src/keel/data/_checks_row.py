"""Built-in per-row checks: schema, chat format, empty fields, invalid UTF-8
and token length."""

from __future__ import annotations

import itertools
import re
from typing import Any

from keel.data._check_base import Check, Context, _content_text, register_check
from keel.data._tokens import context_window, resolve_tokenizer
from keel.data.report import CheckResult
from keel.errors import InvalidRequest

# -- built-in checks -----------------------------------------------------------

_ROLES = {"system", "developer", "user", "assistant", "tool"}


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
            parts = self.ctx.chat(row)
            if parts is not None and all(map(str.strip, parts[1])):
                return  # every message has text
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
        self.over_by_role: dict[str, int] = {}

    def feed(self, i: int, row: dict[str, Any]) -> None:
        if not isinstance(row, dict):
            return
        kind = self.ctx.kind
        parts = self.ctx.chat(row)
        if parts is not None:
            roles, texts = parts
            try:
                over = 3 + sum(map(self.over_by_role.__getitem__, roles))
            except (KeyError, TypeError):
                over = 3
                for r in roles:
                    n = self.counter.overhead(str(r))
                    if type(r) is str:
                        self.over_by_role[r] = n
                    over += n
            self.pending.append((i, len(self.texts), len(texts)))
            self.texts += texts
            self.extra.append(over)
        elif kind == "chat":
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
        if not self.pending:
            return
        counts = self.counter.count_batch(self.texts)
        limit = self.limit
        # Per-row sums: cumulative counts at each row's text bounds.
        cum = [0, *itertools.accumulate(counts)]
        tokens_by_row = [
            extra + cum[start + n] - cum[start]
            for (_, start, n), extra in zip(self.pending, self.extra, strict=True)
        ]
        self.total += sum(tokens_by_row)
        top = max(tokens_by_row)
        if top > self.longest[0]:
            self.longest = (top, self.pending[tokens_by_row.index(top)][0])
        if limit is not None and top > limit:
            for (i, _, _), tokens in zip(self.pending, tokens_by_row, strict=True):
                if tokens > limit:
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
