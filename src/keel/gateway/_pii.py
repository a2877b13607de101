"""The PII detectors behind :class:`keel.gateway.redact.Redactor`.

Every detector is a regex that finds candidates cheaply (a text without any
costs one scan in C) followed, only on a candidate, by a checksum or a parser
where the format has one: Luhn for cards, ISO 7064 mod 97 for IBANs,
:mod:`ipaddress` for IPv6. :func:`_builtins` returns them in the order they
run (e-mail, IPv6, and the numeric kinds together in one scan).

The start-of-finding rules also accept the position right after a JSON escape
(``\\n``, ``\\u00e9``), because a truncated body keeps the first characters of
the raw JSON text as one string and must still be redacted there.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

# A finding starts where the text starts, after a character that cannot be
# part of it, or right after a JSON escape sequence (see the module doc). The
# check comes after the finding's first character, so that every pattern
# starts with a character class and the regex engine skips ahead in C to the
# next place where that class occurs (a leading lookbehind would be tried at
# every position: 5x slower).


def _after_first(excluded: str) -> str:
    return rf"(?:(?<![{excluded}\\].)|(?<=\\[nrtbf].)|(?<=\\u[0-9A-Fa-f]{{4}}.))"


_NUM = _after_first(r"\w.+\-")

# Found by its "@…tld" part (a literal prefix: the fastest search there is);
# the local part is taken by scanning left (_email_span). Unicode \w:
# internationalised addresses are still addresses.
_EMAIL = re.compile(r"@(?:[\w\-]+\.)+[^\W\d_]{2,63}(?![\w\-])")
_EMAIL_LOCAL = frozenset("._%+-")

# The numeric detectors (IBAN, card, IPv4, phone) are written as what follows
# their first character, so that one scan (_numeric) can find where any
# of them may start; the full patterns then only run at those few places.

# An IBAN is found by its first check digit; the country code is checked behind.
_IBAN_TAIL = (
    r"(?<=[A-Za-z]{2}[0-9])"
    r"(?:(?<![A-Za-z0-9\\]...)|(?<=\\[nrtbf]...)|(?<=\\u[0-9A-Fa-f]{4}...))"
    r"[0-9](?:[ ]?[A-Za-z0-9]){11,30}"
)
# A card starts with 2-6 (see _card_span), and its groups have 3 digits or more
# (4-4-4-4, 4-6-5, 4-4-4-4-3). Backtracking is bounded (at most 7 lengths) and
# lets a card followed by another number still end where its own digits end.
_CARD_TAIL = r"(?<=[2-6])" + _NUM + r"(?:(?:[ \-](?=[0-9]{3}))?[0-9]){12,18}(?![\w\-]|\.[0-9])"
_IPV4_TAIL = r"(?<=[0-9])" + _after_first(r"\w.") + r"[0-9]{0,2}(?:\.[0-9]{1,3}){3}(?![\w]|\.[0-9])"
# A national number starts with a trunk 0, or has one of these shapes (after
# its first digit): US/CA 555-123-4567 and 1-800-555-1234, CN 138 0013 8000,
# IN 98765 43210, and (4,3,4), (2,4,4). Checked in the regex, so that rows of
# numbers ("98 87 92 85 77 …") cost no Python call per number.
_NAT_SHAPES = "|".join(
    f"{first}{rest}(?![0-9])"
    for first, rest in [
        ("[0-9]{2}", "[ ./-][0-9]{3}[ ./-][0-9]{4}"),
        ("(?<=1)", "[ ./-][0-9]{3}[ ./-][0-9]{3}[ ./-][0-9]{4}"),
        ("[0-9]{2}", "[ ./-][0-9]{4}[ ./-][0-9]{4}"),
        ("[0-9]{4}", "[ ./-][0-9]{5}"),
        ("[0-9]{3}", "[ ./-][0-9]{3}[ ./-][0-9]{4}"),
        ("[0-9]", "[ ./-][0-9]{4}[ ./-][0-9]{4}"),
    ]
)


def _groups(seps: str, digits: int, least: int, most: int) -> str:
    # The further groups of a phone number. A group that begins a decimal, a
    # dotted number or a time ("… 10.0.0.1", "… 3.5", "… 12:30") is not one.
    return (
        rf"(?:{seps}[0-9]{{{digits},15}}+(?![.:][0-9])|\.[0-9]{{{digits},15}}+(?!:[0-9]))"
        rf"{{{least},{most}}}"
    )


# Digit runs are atomic, separators between runs are required and a candidate
# is at most 8 groups of at most 15 digits: found in bounded time whatever
# follows ("1 1 1 1 …" must not cost a scan of the rest at every group). The
# shape rules are in _phone_shape_ok. Each branch first looks ahead for its
# least number of digits, so the many short numbers of ordinary text are
# dismissed in C.
_PHONE_TAIL = (
    _NUM
    + r"(?:(?<=\+)(?=(?:[ .\-()]{0,2}[0-9]){8})"
    + r"(?P<intl>(?>[0-9]{1,15})(?:[ .\-]?\([0-9]{1,5}\))?(?>"
    + _groups(r"[ \-]", 1, 0, 7)
    + "))"
    + r"|(?<=\()(?=(?:[ .\-)]{0,2}[0-9]){8})"
    + r"(?P<paren>[0-9]{1,5}\)(?>[ .\-]?[0-9]{1,15})(?>"
    + _groups(r"[ \-]", 1, 0, 6)
    + "))"
    + r"|(?<=[0-9])(?:(?<=0)(?=(?:[ ./\-]?[0-9]){8})|(?="
    + _NAT_SHAPES
    + "))"
    + r"(?P<nat>(?>[0-9]{0,14})(?>"
    + _groups(r"[ /\-]", 2, 1, 7)
    + "))"
    + r")"
)
_IBAN = re.compile(r"[0-9]" + _IBAN_TAIL, re.ASCII)
_CARD = re.compile(r"[0-9]" + _CARD_TAIL, re.ASCII)
_IPV4 = re.compile(r"[0-9]" + _IPV4_TAIL, re.ASCII)
_PHONE = re.compile(r"[+(0-9]" + _PHONE_TAIL, re.ASCII)

# Found by ":…:" (every IPv6 address has one: "::" or a middle group), taken
# with the rest of its hex/colon/dot run so that a rejected run is skipped
# whole; then matched from the start of the run (_ipv6_span).
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:.]*")
_IPV6 = re.compile(
    r"(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|[0-9]{1,3}(?:\.[0-9]{1,3}){3})?"
    r"(?![\w:]|\.[0-9])",
    re.ASCII,
)
_HEXCOLON = frozenset("0123456789abcdefABCDEF:")
_WORD = re.compile(r"\w", re.ASCII)
_U_ESCAPE = re.compile(r"\\u[0-9A-Fa-f]{4}")
_ESCAPE_BEFORE = re.compile(r"(?:\\[nrtbf]|\\u[0-9A-Fa-f]{4})$")

_GROUPS = re.compile(r"[0-9]+", re.ASCII)
_DATE_PREFIX = re.compile(
    r"(?:(?:19|20)[0-9]{2}[./\-](?:0?[1-9]|1[0-2])[./\-](?:0?[1-9]|[12][0-9]|3[01])"
    r"|(?:0?[1-9]|[12][0-9]|3[01])[./\-](?:0?[1-9]|1[0-2])[./\-](?:19|20)[0-9]{2})(?![0-9])",
    re.ASCII,
)
# The same shapes, as group lengths (for the trailing-group trimming).
_NATIONAL_SHAPES = {(3, 3, 4), (1, 3, 3, 4), (3, 4, 4), (5, 5), (4, 3, 4), (2, 4, 4)}

_DIGIT = re.compile(r"[0-9]", re.ASCII)

# Registered IBAN lengths (SWIFT IBAN registry). A country not listed here is
# not detected: without the length, mod 97 alone would accept 1 string in 97.
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24,
    "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27,
    "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
    "YE": 30,
}  # fmt: skip


def luhn_ok(digits: str) -> bool:
    """True when a string of digits passes the Luhn checksum."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """True for a compact IBAN with a registered length and a valid mod-97 check."""
    iban = iban.upper()
    if _IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban.isalnum() or not iban.isascii():
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


# -- spans: match → the (start, end) to redact in the text, or None
# ``lo`` is where the text not yet claimed by this detector starts.

Span = tuple[int, int] | None


def _email_span(m: re.Match[str], text: str, lo: int) -> Span:
    at = m.start()
    start = at
    floor = max(lo, at - 256)
    while start > floor:
        c = text[start - 1]
        if c.isalnum() or c in _EMAIL_LOCAL:
            start -= 1
        elif c == "\\" and _U_ESCAPE.match(text, start - 1) and _escapes(text, start - 1):
            start -= 1  # "Jos\u00e9@…" in a truncated body: é is part of the address
        else:
            break
    if (
        0 < start < at
        and text[start] in "nrtbf"
        and text[start - 1] == "\\"
        and _escapes(text, start - 1)
    ):
        start += 1  # "\nbob@…": the n belongs to the escape, not to the address
    return (start, m.end()) if start < at else None


def _escapes(text: str, i: int) -> bool:
    """True when the backslash at ``i`` starts an escape (is not itself escaped)."""
    j = i
    while j > 0 and text[j - 1] == "\\":
        j -= 1
    return (i - j) % 2 == 0


def _card_span(m: re.Match[str], text: str, lo: int) -> Span:
    s = m.group()
    digits = s.replace(" ", "").replace("-", "")
    if not 13 <= len(digits) <= 19:
        return None
    if " " in s and "-" in s:  # real cards are grouped with one separator
        return None
    # Issuer prefixes (Visa, Mastercard, Amex, Diners, JCB, Discover, UnionPay,
    # Maestro). No network starts with 0, 1, 7, 8 or 9, which keeps epoch
    # timestamps (1…) and most numeric ids out.
    first = digits[0]
    if first == "2":
        if not 2221 <= int(digits[:4]) <= 2720:
            return None
    elif first == "3":
        if digits[1] not in "045678":
            return None
    elif first not in "456":
        return None
    return m.span() if luhn_ok(digits) else None


def _iban_span(m: re.Match[str], text: str, lo: int) -> Span:
    start = m.start() - 2
    s = text[start : m.end()]
    want = _IBAN_LENGTHS.get(s[:2].upper())
    if want is None:
        return None
    got = 0
    for i, ch in enumerate(s):
        if ch != " ":
            got += 1
            if got == want:
                end = i + 1
                break
    else:
        return None
    # The IBAN must end where a group ends, not inside a longer word.
    if end < len(s) and s[end] != " ":
        return None
    return (start, start + end) if iban_ok(s[:end].replace(" ", "")) else None


def _ipv6_span(m: re.Match[str], text: str, lo: int) -> Span:
    hint, end = m.span()
    # The hint is the run's first ":h:" or "::", so at most one group (4 hex
    # digits) of an address lies before it.
    start = hint
    floor = max(lo, hint - 4)
    while start > floor and text[start - 1] in _HEXCOLON:
        start -= 1
    if end - start > 90:  # two addresses at most; anything longer is not one
        return None
    # From the start of the run, or just after its first colon when a label
    # comes before it ("IP:2001:db8::1").
    starts = []
    if not (
        start
        and _WORD.match(text, start - 1)
        and not _ESCAPE_BEFORE.search(text, max(0, start - 6), start)
    ):
        starts.append(start)
    if text[start] == ":" and text[start + 1] != ":":
        starts.append(start + 1)
    for s in starts:
        c = _IPV6.match(text, s)
        if c is not None and _ipv6_ok(c.group()):
            return c.span()
    return None


def _ipv6_ok(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False  # e.g. times 12:30:45, MAC addresses
    if "::" in s:
        groups = [g for g in s.replace("::", ":").split(":") if g]
        # "::", "::1" and slices like x[1::2] are not worth a redaction.
        if len(groups) < 2 or (len(groups) == 2 and max(len(g) for g in groups) < 4):
            return False
    return True


def _ipv4_span(m: re.Match[str], text: str, lo: int) -> Span:
    for octet in m.group().split("."):
        if int(octet) > 255 or (len(octet) > 1 and octet[0] == "0"):
            return None
    return m.span()


def _phone_span(m: re.Match[str], text: str, lo: int) -> Span:
    start = m.start()
    s = m.group()
    spans = [g.span() for g in _GROUPS.finditer(s)]
    kind = "intl" if m.group("intl") is not None else "nat" if m.group("nat") else "paren"
    g = len(spans)
    if _WORD.match(text, m.end()):  # "… 24h/24": the last group is part of a word
        g -= 1
    # A card that starts inside the candidate wins ("12 4111 1111 1111 1111").
    for i in range(1, g):
        c = _CARD.match(text, start + spans[i][0])
        if c is not None and _card_span(c, text, lo) is not None:
            g = i
            break
    lo_k = 1 if kind == "intl" else 2
    # The candidate may run on into other numbers ("555-123-4567 2 times",
    # "(555) 123-4567 06 12 34 56 78"): after the whole of it, try the
    # prefixes that end where the separator changes, longest first, then the
    # other prefixes.
    seps = [s[spans[i - 1][1] : spans[i][0]] for i in range(1, g)]  # before group i
    natural = [k for k in range(g - 1, lo_k - 1, -1) if k >= 2 and seps[k - 1] != seps[k - 2]]
    others = [k for k in range(g - 1, lo_k - 1, -1) if k not in natural]
    for k in [g, *natural, *others] if g >= lo_k else ():
        lens = tuple(b - a for a, b in spans[:k])
        end = spans[k - 1][1]
        if _phone_shape_ok(kind, s[:end], lens):
            return start, start + end
    return None


def _phone_shape_ok(kind: str, s: str, lens: tuple[int, ...]) -> bool:
    n = sum(lens)
    if kind == "intl":  # no format ends on a single digit: "+1 555 123 4567 2 times"
        return 8 <= n <= 15 and (lens[-1] > 1 or len(lens) == 1)
    if kind == "paren":
        return 8 <= n <= 13
    if not 9 <= n <= 13 or min(lens[1:]) < 2 or _DATE_PREFIX.match(s):
        return False
    # 12 345 678, 1.234.567.890: thousands, not a phone number.
    if lens[0] <= 3 and all(x == 3 for x in lens[1:]):
        return False
    # Pairs make a phone number only as five (06 12 34 56 78), not as a row.
    if all(x == 2 for x in lens) and len(lens) != 5:
        return False
    if s[0] == "0":
        return not s.startswith("000")
    return lens in _NATIONAL_SHAPES


def _whole(m: re.Match[str], text: str, lo: int) -> Span:
    return m.span() if m.end() > m.start() else None


Finder = Callable[[re.Match[str], str, int], tuple[int, int, str] | None]


class _Detector:
    """A regex that finds candidates cheaply and a function that validates one.

    ``find(match, text, lo)`` returns ``(start, end, kind)`` to redact, or None.
    """

    __slots__ = ("find", "kinds", "needs", "rescan", "rx")

    def __init__(
        self,
        kinds: tuple[str, ...],
        rx: re.Pattern[str],
        find: Finder,
        needs: str | None = None,
        rescan: bool = False,
    ) -> None:
        self.kinds = kinds
        self.rx = rx
        self.find = find
        self.needs = needs  # "digit", or one character that must occur
        # After a rejected candidate, search again from its second character
        # rather than from its end: an IBAN candidate runs on into the next
        # words, a phone candidate over every space-separated number that follows.
        self.rescan = rescan


def _single(kind: str, rx: re.Pattern[str], span: Callable[..., Span], **kw: Any) -> _Detector:
    def find(m: re.Match[str], text: str, lo: int) -> tuple[int, int, str] | None:
        sp = span(m, text, lo)
        return None if sp is None else (sp[0], sp[1], kind)

    return _Detector((kind,), rx, find, **kw)


# Precedence at one place: an IBAN or a card before PHONE sees its digit groups.
_NUMERIC = (
    ("IBAN", _IBAN_TAIL, _IBAN, _iban_span),
    ("CREDIT_CARD", _CARD_TAIL, _CARD, _card_span),
    ("IPV4", _IPV4_TAIL, _IPV4, _ipv4_span),
    ("PHONE", _PHONE_TAIL, _PHONE, _phone_span),
)


def _numeric(kinds: set[str]) -> _Detector | None:
    """One detector for the numeric kinds in ``kinds``: a single scan of the text."""
    chosen = [n for n in _NUMERIC if n[0] in kinds]
    if not chosen:
        return None
    first = "[+(0-9]" if "PHONE" in kinds else "[0-9]"
    gate = re.compile(first + "(?=" + "|".join(f"(?:{n[1]})" for n in chosen) + ")", re.ASCII)

    def find(m: re.Match[str], text: str, lo: int) -> tuple[int, int, str] | None:
        at = m.start()
        for kind, _tail, rx, span in chosen:
            c = rx.match(text, at)
            if c is not None:
                sp = span(c, text, lo)
                if sp is not None and sp[0] >= lo:
                    return sp[0], sp[1], kind
        return None

    return _Detector(tuple(n[0] for n in chosen), gate, find, needs="digit", rescan=True)


BUILTIN_KINDS = ("EMAIL", "IPV6", "IBAN", "CREDIT_CARD", "IPV4", "PHONE")


def _builtins(skip: set[str]) -> list[_Detector]:
    # An IPv6 address is claimed before IPV4 sees its embedded IPv4 tail.
    out = []
    if "EMAIL" not in skip:
        out.append(_single("EMAIL", _EMAIL, _email_span, needs="@"))
    if "IPV6" not in skip:
        out.append(_single("IPV6", _IPV6_HINT, _ipv6_span, needs=":"))
    numeric = _numeric({n[0] for n in _NUMERIC} - skip)
    if numeric is not None:
        out.append(numeric)
    return out
