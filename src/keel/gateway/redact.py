"""PII redaction of recorded calls, and the capture mode of each model alias.

:class:`Redactor` finds personal data in text (e-mail addresses, phone numbers,
payment cards, IBANs, IP addresses and any named regex from the settings) and
replaces each finding with ``[REDACTED:KIND]``. Detection is usable on its own
(:meth:`Redactor.detect`), so dataset validation can reuse the same detectors.

:class:`CaptureEnricher` applies an alias' capture mode to trace records. It is
a :attr:`keel.store.recorder.Recorder.enrichers` callable: it runs in the
writer thread, never on the request path.

The detectors live in :mod:`keel.gateway._pii`: each is a regex that finds
candidates cheaply, then a checksum or a parser where the format has one (Luhn
for cards, ISO 7064 mod 97 for IBANs, :mod:`ipaddress` for IPv6). Detectors run
one after another on the text left by the previous ones (custom patterns, then
e-mail, IPv6, and the numeric kinds together), so a span is never counted
twice.
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING, Any

import orjson

from keel.errors import ConfigError
from keel.gateway._pii import (
    _DIGIT,
    BUILTIN_KINDS,
    Finder,
    Span,
    _builtins,
    _single,
    _whole,
    iban_ok,
    luhn_ok,
)

if TYPE_CHECKING:
    from keel.config import Settings
    from keel.tracing.model import TraceRecord

__all__ = [
    "BUILTIN_KINDS",
    "CAPTURE_MODES",
    "CaptureEnricher",
    "Finder",
    "Redactor",
    "Span",
    "format_counts",
    "iban_ok",
    "luhn_ok",
]

log = logging.getLogger("keel.redact")

CAPTURE_MODES = ("full", "redacted", "metadata-only")


_SEP = "\x00"  # joins a JSON document's strings; no built-in detector spans it


class Redactor:
    """Finds and masks personal data in text. Thread-safe; build once, reuse.

    ``patterns`` adds named regexes (``{"ticket": r"TCK-[0-9]{6}"}`` redacts as
    ``[REDACTED:TICKET]``); they run before the built-ins, and one named like a
    built-in (``email``) replaces it.
    """

    def __init__(self, patterns: dict[str, str] | None = None) -> None:
        custom = []
        for name, rx in (patterns or {}).items():
            try:
                compiled = re.compile(rx)
            except re.error as e:
                raise ConfigError(
                    f"redaction.patterns.{name}: not a valid regular expression: {e}"
                ) from None
            custom.append(_single(name.upper(), compiled, _whole))
        names = {d.kinds[0] for d in custom}
        self._detectors = custom + _builtins(names)
        self._labels = {k: f"[REDACTED:{k}]" for d in self._detectors for k in d.kinds}

    @property
    def kinds(self) -> tuple[str, ...]:
        """The names of the detectors, in the order they run."""
        return tuple(k for d in self._detectors for k in d.kinds)

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        """Replace each finding with ``[REDACTED:KIND]``; also count them by kind."""
        counts: dict[str, int] = {}
        if not text:
            return text, counts
        labels = self._labels
        has_digit: bool | None = None
        for det in self._detectors:
            needs = det.needs
            if needs is not None:
                if needs == "digit":
                    if has_digit is None:
                        has_digit = _DIGIT.search(text) is not None
                    if not has_digit:
                        continue
                elif needs not in text:
                    continue
            pieces: list[str] | None = None
            pos = at = 0
            find = det.find
            search = det.rx.search
            size = len(text)
            # (search clamps a start past the end, so an empty match there recurs)
            while at <= size and (m := search(text, at)):
                hit = find(m, text, pos)
                if hit is None:
                    at = m.start() + 1 if det.rescan else max(m.end(), m.start() + 1)
                    continue
                start, end, kind = hit
                if pieces is None:
                    pieces = []
                pieces.append(text[pos:start])
                pieces.append(labels[kind])
                counts[kind] = counts.get(kind, 0) + 1
                # What the finding did not claim (a phone's trailing group, the
                # words after an IBAN) is searched again.
                pos = at = end
            if pieces is not None:
                pieces.append(text[pos:])
                text = "".join(pieces)
        return text, counts

    def detect(self, text: str) -> dict[str, int]:
        """Count the findings in ``text`` by kind (``{}``: none), changing nothing."""
        return self.redact(text)[1]

    def redact_obj(self, obj: Any) -> tuple[Any, dict[str, int]]:
        """Redact every string value of a parsed JSON value; keys are kept.

        Returns the same object when nothing was found, else a new one.
        """
        strings: list[str] = []
        _collect(obj, strings)
        if not strings:
            return obj, {}
        joined = _SEP.join(strings)
        if joined.count(_SEP) == len(strings) - 1:
            # One scan over all the values costs far less than one per value.
            red, counts = self.redact(joined)
            if not counts:
                return obj, counts
            parts = red.split(_SEP)
            if len(parts) == len(strings):
                return _rebuild(obj, iter(parts)), counts
        # A custom pattern matched across values (or a value holds the joiner).
        counts = {}
        parts = []
        for s in strings:
            r, c = self.redact(s)
            parts.append(r)
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
        if not counts:
            return obj, counts
        return _rebuild(obj, iter(parts)), counts

    def redact_json_text(self, text: str) -> tuple[str, dict[str, int]]:
        """Redact the string values of a JSON document, keys untouched.

        A changed document is re-serialised compactly; an unchanged one is
        returned as it was. Text that is not JSON is redacted as plain text.
        """
        if not text:
            return text, {}
        try:
            obj = orjson.loads(text)
        except ValueError:
            return self.redact(text)
        new, counts = self.redact_obj(obj)
        if not counts:
            return text, counts
        if _has_huge_float(obj):
            # orjson reads integers beyond 64 bits as floats: read it again
            # exactly, so that redaction changes nothing but strings.
            new, counts = self.redact_obj(json.loads(text))
            return json.dumps(new, ensure_ascii=False, separators=(",", ":")), counts
        return orjson.dumps(new).decode(), counts


def _collect(obj: Any, out: list[str]) -> None:
    if isinstance(obj, str):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _collect(v, out)


def _has_huge_float(obj: Any) -> bool:
    # Where orjson read an integer beyond 64 bits (or a float that large).
    if isinstance(obj, float):
        return abs(obj) >= 9.2e18  # 2**63
    if isinstance(obj, dict):
        return any(_has_huge_float(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_huge_float(v) for v in obj)
    return False


def _rebuild(obj: Any, parts: Any) -> Any:
    # Walks in exactly the order of _collect.
    if isinstance(obj, str):
        return next(parts)
    if isinstance(obj, dict):
        return {k: _rebuild(v, parts) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebuild(v, parts) for v in obj]
    return obj


def format_counts(counts: dict[str, int]) -> str:
    """``{"PHONE": 1, "EMAIL": 2}`` → ``"EMAIL:2,PHONE:1"``."""
    return ",".join(f"{k}:{v}" for k, v in sorted(counts.items()))


def _merge_tags(tags: str | None, counts: dict[str, int]) -> str:
    obj: dict[str, Any] = {}
    if tags:
        try:
            parsed = orjson.loads(tags)
        except orjson.JSONDecodeError:
            parsed = tags
        obj = parsed if isinstance(parsed, dict) else {"_tags": parsed}
    obj["_redacted"] = format_counts(counts)
    return orjson.dumps(obj).decode()


class CaptureEnricher:
    """Applies each alias' capture mode to trace records, for ``Recorder.enrichers``.

    ``full`` keeps a record as it is; ``redacted`` redacts the request and
    response bodies and the error message; ``metadata-only`` drops both
    bodies and redacts the error message. What was redacted is counted in the
    record's tags under ``_redacted`` (``"EMAIL:2,PHONE:1"``).

    It never raises: a record it cannot clean loses its bodies and error
    message, and the failure is logged and counted in ``failures``.
    """

    def __init__(
        self, *, default_mode: str, mode_by_alias: dict[str, str], redactor: Redactor
    ) -> None:
        pairs = [("redaction.default_capture", default_mode)]
        pairs += [(f"models.{alias}.capture", mode) for alias, mode in mode_by_alias.items()]
        for where, mode in pairs:
            if mode not in CAPTURE_MODES:
                raise ConfigError(
                    f"{where}: capture mode must be one of {', '.join(CAPTURE_MODES)}, not {mode!r}"
                )
        self.default_mode = default_mode
        self.mode_by_alias = dict(mode_by_alias)
        self.redactor = redactor
        self.records_redacted = 0  # records that had at least one finding
        self.findings = 0
        self.failures = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> CaptureEnricher:
        """Capture modes of every configured alias, plus the embedded local models."""
        default = settings.redaction.default_capture
        modes = {alias: spec.capture or default for alias, spec in settings.models.items()}
        for alias in ("local", "local-embed"):
            modes.setdefault(alias, default)
        return cls(
            default_mode=default,
            mode_by_alias=modes,
            redactor=Redactor(settings.redaction.patterns),
        )

    @property
    def active(self) -> bool:
        """False when every alias captures in full (the enricher would do nothing)."""
        return self.default_mode != "full" or any(m != "full" for m in self.mode_by_alias.values())

    def mode_for(self, alias: str | None) -> str:
        return self.mode_by_alias.get(alias, self.default_mode) if alias else self.default_mode

    def __call__(self, batch: list[TraceRecord]) -> None:
        modes = self.mode_by_alias
        default = self.default_mode
        for rec in batch:
            mode = modes.get(rec.get("model"), default)  # type: ignore[arg-type]
            if mode == "full":
                continue
            try:
                self._apply(rec, mode)
            except Exception:
                self.failures += 1
                log.exception("redaction failed for trace %s; bodies dropped", rec.get("id"))
                rec["request_body"] = None
                rec["response_body"] = None
                rec["error_message"] = None

    def _apply(self, rec: TraceRecord, mode: str) -> None:
        total: dict[str, int] = {}
        red = self.redactor
        if mode == "metadata-only":
            rec["request_body"] = None
            rec["response_body"] = None
        else:
            for field in ("request_body", "response_body"):
                body = rec.get(field)
                if body:
                    rec[field], counts = red.redact_json_text(body)  # type: ignore[literal-required]
                    for k, v in counts.items():
                        total[k] = total.get(k, 0) + v
        msg = rec.get("error_message")
        if msg:
            rec["error_message"], counts = red.redact(msg)
            for k, v in counts.items():
                total[k] = total.get(k, 0) + v
        if total:
            rec["tags"] = _merge_tags(rec.get("tags"), total)
            self.records_redacted += 1
            self.findings += sum(total.values())
