"""PII redaction: the detectors, JSON bodies, capture modes, and the recorder path."""

from __future__ import annotations

import time

import orjson
import pytest
import sqlalchemy as sa

from keel._ids import new_id
from keel.config import Settings
from keel.errors import ConfigError
from keel.gateway.calls import clip_body
from keel.gateway.redact import CaptureEnricher, Redactor, iban_ok, luhn_ok
from keel.store.engine import make_engine, migrate
from keel.store.recorder import Recorder


@pytest.fixture(scope="module")
def r() -> Redactor:
    return Redactor()


def only(r: Redactor, text: str, kind: str) -> None:
    """``text`` is exactly one finding of ``kind``, redacted whole inside a sentence."""
    red, counts = r.redact(f"see {text} now")
    assert (red, counts) == (f"see [REDACTED:{kind}] now", {kind: 1}), text


def untouched(r: Redactor, text: str) -> None:
    assert r.redact(text) == (text, {}), text


# -- detectors ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "jane.doe@example.com",
        "a.b+tag@mail.sub.example.co.uk",
        "first_last-99%x@example.io",
        "josé@exämple.com",
    ],
)
def test_email(r, text):
    only(r, text, "EMAIL")


@pytest.mark.parametrize(
    "text", ["@handle", "user@localhost", "a@b", "foo@bar.c", "x @ y.com", "email me at"]
)
def test_email_negatives(r, text):
    untouched(r, text)


@pytest.mark.parametrize(
    "text",
    [
        "+44 20 7946 0958",
        "+1 (555) 123-4567",
        "+14155552671",
        "+33 6 12 34 56 78",
        "+49-30-12345678",
        "(555) 123-4567",
        "555-123-4567",
        "555.123.4567",
        "1-800-555-1234",
        "06 12 34 56 78",
        "020 7946 0958",
        "030-12345678",
        "0412 345 678",
    ],
)
def test_phone(r, text):
    only(r, text, "PHONE")


@pytest.mark.parametrize(
    "text",
    [
        "1699999999999",  # epoch ms
        "12345678901",  # a long number without separators
        "order 84721990",
        "2024-01-15",
        "2024-01-15 10:30",
        "15.01.2024 12:00",
        "10:30:45",
        "1.2.3.4.5",
        "v2.10.100",
        "12 345 678",  # thousands
        "1.234.567.890",
        "it takes 3-5 days",
        "scores 98 87 92 85 77",
        "+5 - 3",
        "ref 0000 1111 2222 3333",
        "1e+10",
        "123e4567-e89b-12d3-a456-426614174000",
    ],
)
def test_phone_negatives(r, text):
    untouched(r, text)


def test_phone_followed_by_another_number_keeps_that_number(r):
    assert r.redact("call 555-123-4567 2 times") == (
        "call [REDACTED:PHONE] 2 times",
        {"PHONE": 1},
    )
    assert r.redact("on 2024-01-15 call 555-123-4567")[0] == "on 2024-01-15 call [REDACTED:PHONE]"
    assert r.redact("+1 555 123 4567 2 times")[0] == "[REDACTED:PHONE] 2 times"
    assert r.redact("555-123-4567 555-123-4567")[1] == {"PHONE": 2}
    assert r.redact("+44 20 7946 0958 2024-01-01")[0] == "[REDACTED:PHONE] 2024-01-01"
    assert r.redact("020 7946 0958 2024 was")[0] == "[REDACTED:PHONE] 2024 was"
    assert r.redact("(555) 123-4567 10.0.0.1 +44 20 7946 0958 12:30 3.5") == (
        "[REDACTED:PHONE] [REDACTED:IPV4] [REDACTED:PHONE] 12:30 3.5",
        {"PHONE": 2, "IPV4": 1},
    )
    assert r.redact("row 12 4111 1111 1111 1111")[0] == "row 12 [REDACTED:CREDIT_CARD]"
    assert r.redact("06 12 34 56 78 24h/24, 555-123-4567 5pm")[0] == (
        "[REDACTED:PHONE] 24h/24, [REDACTED:PHONE] 5pm"
    )
    assert r.redact("(555) 123-4567 06 12 34 56 78") == (
        "[REDACTED:PHONE] [REDACTED:PHONE]",
        {"PHONE": 2},
    )


@pytest.mark.parametrize(
    "text",
    [
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "4111111111111111",
        "5555555555554444",
        "2223003122003222",  # Mastercard 2-series
        "3782 822463 10005",  # Amex 4-6-5
        "6011111111111117",  # Discover
        "3530111333300000",  # JCB
        "4222222222222",  # 13-digit Visa
    ],
)
def test_credit_card(r, text):
    assert luhn_ok(text.replace(" ", "").replace("-", ""))
    only(r, text, "CREDIT_CARD")


@pytest.mark.parametrize(
    "text",
    [
        "4111 1111 1111 1112",  # Luhn fails
        "4111111111111112",
        "1699999999999",  # epoch ms: no issuer starts with 1
        "9111111111111111",
        "4111 1111-1111 1111",  # mixed grouping
        "94111111111111111",  # a valid card inside a longer id is not a card
        "12345678901234567890123",
    ],
)
def test_credit_card_negatives(r, text):
    assert r.detect(text).get("CREDIT_CARD") is None, text


def test_luhn_valid_timestamp_is_not_a_card(r):
    # Epoch milliseconds that pass the checksum: only the issuer prefix tells.
    ts = next(f"170000000000{d}" for d in range(10) if luhn_ok(f"170000000000{d}"))
    assert r.detect(f"created {ts}") == {}


@pytest.mark.parametrize(
    "text",
    [
        "DE89 3704 0044 0532 0130 00",
        "DE89370400440532013000",
        "GB82WEST12345698765432",
        "GB82 WEST 1234 5698 7654 32",
        "gb82 west 1234 5698 7654 32",
        "FR14 2004 1010 0505 0001 3M02 606",
        "NL91ABNA0417164300",
        "NO9386011117947",
    ],
)
def test_iban(r, text):
    assert iban_ok(text.replace(" ", ""))
    only(r, text, "IBAN")


@pytest.mark.parametrize(
    "text",
    [
        "DE89370400440532013001",  # mod 97 fails
        "DE88 3704 0044 0532 0130 00",
        "GB82WEST1234569876543",  # one character short for GB
        "XX82WEST12345698765432",  # not a country with IBANs
        "DE8937040044053201300012",  # runs on into more digits
        "ABCD1234EFGH5678",
    ],
)
def test_iban_negatives(r, text):
    assert r.detect(text).get("IBAN") is None, text


def test_two_ibans_in_a_row(r):
    text = "DE89 3704 0044 0532 0130 00 and GB82WEST12345698765432."
    assert r.redact(text) == ("[REDACTED:IBAN] and [REDACTED:IBAN].", {"IBAN": 2})


@pytest.mark.parametrize("text", ["192.168.1.100", "8.8.8.8", "10.0.0.1", "255.255.255.255"])
def test_ipv4(r, text):
    only(r, text, "IPV4")
    assert r.redact(f"from {text}.")[0] == "from [REDACTED:IPV4]."


@pytest.mark.parametrize(
    "text",
    ["256.1.1.1", "1.2.3.4.5", "v1.2.3.4", "01.02.03.04", "3.14", "2.10.100", "1.2.3"],
)
def test_ipv4_negatives(r, text):
    untouched(r, text)


@pytest.mark.parametrize(
    "text",
    [
        "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
        "2001:db8:85a3::8a2e:370:7334",
        "2001:db8::1",
        "fe80::1",
        "::ffff:192.0.2.128",
        "FE80::0202:B3FF:FE1E:8329",
    ],
)
def test_ipv6(r, text):
    only(r, text, "IPV6")


def test_ipv6_in_urls_and_after_a_label(r):
    assert r.redact("http://[2001:db8::1]:8080/")[0] == "http://[[REDACTED:IPV6]]:8080/"
    assert r.redact("IP:2001:db8::1")[0] == "IP:[REDACTED:IPV6]"


@pytest.mark.parametrize(
    "text",
    [
        "12:30:45",
        "12:30:45.123",
        "00:1A:2B:3C:4D:5E",  # MAC address
        "std::vector<int>",
        "x[1::2]",
        "a[::2]",
        "ratio 16:9:4",
        "123e4567-e89b-12d3-a456-426614174000",
    ],
)
def test_ipv6_negatives(r, text):
    untouched(r, text)


def test_mixed_text_counts(r):
    text = (
        "Mail jane@example.com or bob@example.org, call +44 20 7946 0958, "
        "card 4111 1111 1111 1111, IBAN GB82 WEST 1234 5698 7654 32, host 10.1.2.3, "
        "v6 2001:db8::7. Order 84721 ships in 3-5 days (v2.4.1, 2024-03-12 10:30)."
    )
    red, counts = r.redact(text)
    assert counts == {
        "EMAIL": 2,
        "PHONE": 1,
        "CREDIT_CARD": 1,
        "IBAN": 1,
        "IPV4": 1,
        "IPV6": 1,
    }
    assert r.detect(text) == counts
    assert red.count("[REDACTED:") == 7
    assert "Order 84721 ships in 3-5 days (v2.4.1, 2024-03-12 10:30)." in red
    assert "example" not in red and "4111" not in red and "7946" not in red


def test_no_pii_returns_the_same_string(r):
    text = "Nothing to see here: 42 apples, version 1.2.3, 12:30."
    red, counts = r.redact(text)
    assert red is text and counts == {}
    assert r.redact("") == ("", {})


@pytest.mark.parametrize(
    "unit",
    [
        "1 ",
        "12 ",
        "1-",
        "1.",
        "7",
        ":",
        "a:",
        "a@",
        "a@b.",
        "+1 ",
        "(1) ",
        "DE89 ",
        "4111 ",
        "\\n1",
    ],
)
def test_pathological_input_costs_linear_time(r, unit):
    # One repeated unit, 5 000 and 50 000 characters: linear work grows ~10x,
    # quadratic work ~100x (and would take minutes at 50 000).
    small = unit * (5_000 // len(unit))
    big = unit * (50_000 // len(unit))
    t0 = time.perf_counter()
    r.redact(small)
    t_small = time.perf_counter() - t0
    t0 = time.perf_counter()
    r.redact(big)
    t_big = time.perf_counter() - t0
    assert t_big < 35 * t_small + 0.05


def test_finding_after_a_json_escape(r):
    # A truncated body keeps raw JSON text: "\n" and "\u00e9" are six and two
    # characters there, and must not hide what follows them.
    raw = r"line\nbob@example.com\n555-123-4567\t10.0.0.1 Jos\u00e9@example.com"
    red, counts = r.redact(raw)
    assert red == r"line\n[REDACTED:EMAIL]\n[REDACTED:PHONE]\t[REDACTED:IPV4] [REDACTED:EMAIL]"
    assert counts == {"EMAIL": 2, "PHONE": 1, "IPV4": 1}


# -- custom patterns ---------------------------------------------------------


def test_custom_patterns():
    r = Redactor({"ticket": r"TCK-[0-9]{6}", "Employee_ID": r"\bE[0-9]{5}\b"})
    assert r.kinds[:2] == ("TICKET", "EMPLOYEE_ID")
    red, counts = r.redact("TCK-123456 for E12345, not E1234; mail a@example.com")
    assert red == "[REDACTED:TICKET] for [REDACTED:EMPLOYEE_ID], not E1234; mail [REDACTED:EMAIL]"
    assert counts == {"TICKET": 1, "EMPLOYEE_ID": 1, "EMAIL": 1}


def test_custom_pattern_replaces_a_builtin_of_the_same_name():
    r = Redactor({"phone": r"\bext\. [0-9]{3}\b"})
    assert r.kinds.count("PHONE") == 1
    red, counts = r.redact("ext. 123 or 555-123-4567")
    assert red == "[REDACTED:PHONE] or 555-123-4567" and counts == {"PHONE": 1}
    # The other numeric detectors are still there.
    assert r.detect("4111 1111 1111 1111 10.0.0.1") == {"CREDIT_CARD": 1, "IPV4": 1}


def test_custom_pattern_that_can_match_empty_terminates():
    r = Redactor({"x": r"z*"})
    assert r.redact("abc zz") == ("abc [REDACTED:X]", {"X": 1})


def test_invalid_custom_pattern_is_a_config_error():
    with pytest.raises(ConfigError, match=r"redaction.patterns.bad"):
        Redactor({"bad": "(unclosed"})


# -- JSON --------------------------------------------------------------------


def test_json_values_redacted_keys_kept(r):
    doc = {
        "model": "gpt",
        "jane@example.com": "jane@example.com",
        "messages": [
            {"role": "user", "content": "call 555-123-4567"},
            {"role": "user", "content": ["10.0.0.1", {"deep": ["x", "bob@example.org"]}]},
        ],
        "n": 5551234567,
        "temperature": 0.2,
        "stream": False,
        "stop": None,
    }
    text = orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()
    red, counts = r.redact_json_text(text)
    assert counts == {"EMAIL": 2, "PHONE": 1, "IPV4": 1}
    assert "\n" not in red  # re-serialised compactly
    out = orjson.loads(red)
    assert out == {
        "model": "gpt",
        "jane@example.com": "[REDACTED:EMAIL]",
        "messages": [
            {"role": "user", "content": "call [REDACTED:PHONE]"},
            {
                "role": "user",
                "content": ["[REDACTED:IPV4]", {"deep": ["x", "[REDACTED:EMAIL]"]}],
            },
        ],
        "n": 5551234567,  # numbers are not strings: untouched
        "temperature": 0.2,
        "stream": False,
        "stop": None,
    }


def test_json_without_findings_is_returned_as_it_was(r):
    text = '{ "messages": [ {"role": "user", "content": "hello"} ], "n": 1 }'
    red, counts = r.redact_json_text(text)
    assert red is text and counts == {}


def test_json_scalar_and_non_json(r):
    assert r.redact_json_text('"mail a@example.com"') == ('"mail [REDACTED:EMAIL]"', {"EMAIL": 1})
    assert r.redact_json_text("not json: a@example.com {") == (
        "not json: [REDACTED:EMAIL] {",
        {"EMAIL": 1},
    )
    assert r.redact_json_text("") == ("", {})
    assert r.redact_json_text("12345") == ("12345", {})


def test_json_big_integers_survive_redaction(r):
    text = '{"id":123456789012345678901234567890,"neg":-9223372036854775809,"m":"a@example.com"}'
    red, counts = r.redact_json_text(text)
    assert counts == {"EMAIL": 1}
    assert red == (
        '{"id":123456789012345678901234567890,"neg":-9223372036854775809,"m":"[REDACTED:EMAIL]"}'
    )


def test_json_custom_pattern_never_spans_two_values():
    r = Redactor({"span": r"START.*END"})
    text = orjson.dumps({"a": "START here", "b": "there END", "c": "START x END"}).decode()
    red, counts = r.redact_json_text(text)
    assert counts == {"SPAN": 1}
    assert orjson.loads(red) == {"a": "START here", "b": "there END", "c": "[REDACTED:SPAN]"}


def test_json_value_holding_a_nul_character(r):
    text = orjson.dumps({"a": "x\x00y a@example.com", "b": "555-123-4567"}).decode()
    red, counts = r.redact_json_text(text)
    assert counts == {"EMAIL": 1, "PHONE": 1}
    assert orjson.loads(red) == {"a": "x\x00y [REDACTED:EMAIL]", "b": "[REDACTED:PHONE]"}


def test_truncated_body_head_is_redacted(r):
    body = orjson.dumps(
        {
            "model": "gpt",
            "messages": [
                {"role": "system", "content": "Be brief.\nUser data follows:"},
                {"role": "user", "content": "\nI am Jos\u00e9, jose@example.com\n+44 20 7946 0958"},
                {"role": "user", "content": "x" * 500},
            ],
        },
        option=orjson.OPT_INDENT_2,
    ).decode()
    clipped = clip_body(body, 300)
    assert orjson.loads(clipped)["_keel_truncated"] is True
    assert "jose@example.com" in clipped
    red, counts = r.redact_json_text(clipped)
    assert counts == {"EMAIL": 1, "PHONE": 1}
    out = orjson.loads(red)
    assert out["_keel_truncated"] is True and out["length"] == len(body)
    assert out["head"] == orjson.loads(clipped)["head"].replace(
        "jose@example.com", "[REDACTED:EMAIL]"
    ).replace("+44 20 7946 0958", "[REDACTED:PHONE]")


# -- capture modes -------------------------------------------------------------


def make_trace(model: str, **over) -> dict:
    req = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a support bot."},
            {"role": "user", "content": "I'm jane@example.com, call me on +44 20 7946 0958."},
        ],
        "temperature": 0.2,
    }
    resp = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1717171717,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Thanks, I'll mail jane@example.com."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28},
    }
    t = {
        "id": new_id(),
        "started_at_ms": int(time.time() * 1000),
        "duration_ms": 12.5,
        "endpoint": "chat",
        "model": model,
        "provider": "p",
        "upstream_model": "m",
        "status": "ok",
        "http_status": 200,
        "error_type": None,
        "error_message": None,
        "stream": False,
        "prompt_tokens": 20,
        "completion_tokens": 8,
        "total_tokens": 28,
        "tokens_estimated": False,
        "tags": '{"team":"support"}',
        "request_body": orjson.dumps(req).decode(),
        "response_body": orjson.dumps(resp).decode(),
    }
    t.update(over)
    return t


@pytest.fixture
def enricher() -> CaptureEnricher:
    return CaptureEnricher(
        default_mode="full",
        mode_by_alias={"safe": "redacted", "meta": "metadata-only", "open": "full"},
        redactor=Redactor(),
    )


def test_full_mode_leaves_the_record_alone(enricher):
    rec = make_trace("open")
    before = dict(rec)
    enricher([rec])
    assert rec == before
    unknown = make_trace("not-configured")  # the default mode: full
    before = dict(unknown)
    enricher([unknown])
    assert unknown == before


def test_redacted_mode(enricher):
    rec = make_trace(
        "safe",
        status="error",
        error_type="upstream_error",
        error_message="upstream said: bad address jane@example.com from 10.0.0.9",
    )
    enricher([rec])
    assert "jane@" not in rec["request_body"] and "7946" not in rec["request_body"]
    req = orjson.loads(rec["request_body"])
    assert req["messages"][1]["content"] == "I'm [REDACTED:EMAIL], call me on [REDACTED:PHONE]."
    assert req["messages"][0]["content"] == "You are a support bot."
    resp = orjson.loads(rec["response_body"])
    assert resp["choices"][0]["message"]["content"] == "Thanks, I'll mail [REDACTED:EMAIL]."
    assert resp["created"] == 1717171717
    assert (
        rec["error_message"] == "upstream said: bad address [REDACTED:EMAIL] from [REDACTED:IPV4]"
    )
    assert orjson.loads(rec["tags"]) == {"team": "support", "_redacted": "EMAIL:3,IPV4:1,PHONE:1"}
    assert enricher.records_redacted == 1 and enricher.findings == 5


def test_redacted_mode_without_findings_keeps_body_text_and_tags(enricher):
    rec = make_trace("safe", request_body='{"messages": [{"role": "user", "content": "hi"}]}')
    rec["response_body"] = None
    rec["tags"] = None
    enricher([rec])
    assert rec["request_body"] == '{"messages": [{"role": "user", "content": "hi"}]}'
    assert rec["tags"] is None


def test_redacted_mode_truncated_body_and_odd_tags(enricher):
    big = orjson.dumps(
        {"messages": [{"role": "user", "content": "card 4111 1111 1111 1111 " + "y" * 400}]}
    ).decode()
    rec = make_trace("safe", request_body=clip_body(big, 100), tags=None)
    rec2 = make_trace("safe", tags="not json")
    rec3 = make_trace("safe", tags='["a"]')
    enricher([rec, rec2, rec3])
    wrapper = orjson.loads(rec["request_body"])
    assert wrapper["_keel_truncated"] is True and wrapper["length"] == len(big)
    assert "[REDACTED:CREDIT_CARD]" in wrapper["head"] and "4111" not in wrapper["head"]
    # The head's card, and the e-mail of the (untouched) response.
    assert orjson.loads(rec["tags"]) == {"_redacted": "CREDIT_CARD:1,EMAIL:1"}
    assert orjson.loads(rec2["tags"]) == {"_tags": "not json", "_redacted": "EMAIL:2,PHONE:1"}
    assert orjson.loads(rec3["tags"]) == {"_tags": ["a"], "_redacted": "EMAIL:2,PHONE:1"}


def test_metadata_only_mode(enricher):
    rec = make_trace("meta", status="error", error_message="no such user +1 (555) 123-4567")
    enricher([rec])
    assert rec["request_body"] is None and rec["response_body"] is None
    assert rec["error_message"] == "no such user [REDACTED:PHONE]"
    assert orjson.loads(rec["tags"]) == {"team": "support", "_redacted": "PHONE:1"}
    assert rec["prompt_tokens"] == 20 and rec["model"] == "meta"
    clean = make_trace("meta")
    enricher([clean])
    assert clean["request_body"] is None and clean["tags"] == '{"team":"support"}'


def test_a_record_that_cannot_be_cleaned_loses_its_bodies(enricher):
    bad = make_trace("safe", request_body=12345, error_message="from a@example.com")
    good = make_trace("safe")
    enricher([bad, good])
    assert enricher.failures == 1
    assert bad["request_body"] is None and bad["response_body"] is None
    assert bad["error_message"] is None
    assert "[REDACTED:EMAIL]" in good["request_body"]


def test_invalid_mode_is_a_config_error():
    with pytest.raises(ConfigError, match=r"models\.x\.capture"):
        CaptureEnricher(default_mode="full", mode_by_alias={"x": "none"}, redactor=Redactor())
    with pytest.raises(ConfigError, match=r"redaction\.default_capture"):
        CaptureEnricher(default_mode="partial", mode_by_alias={}, redactor=Redactor())


def test_from_settings():
    settings = Settings(
        providers={"p": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        models={
            "plain": "p/m",
            "secret": {"deployments": [{"provider": "p", "model": "m"}], "capture": "redacted"},
            "open": {"deployments": [{"provider": "p", "model": "m"}], "capture": "full"},
        },
        redaction={"default_capture": "metadata-only", "patterns": {"ticket": r"TCK-\d+"}},
    )
    e = CaptureEnricher.from_settings(settings)
    assert e.mode_by_alias == {
        "plain": "metadata-only",
        "secret": "redacted",
        "open": "full",
        "local": "metadata-only",
        "local-embed": "metadata-only",
    }
    assert e.default_mode == "metadata-only" and e.active
    assert e.mode_for("unknown") == "metadata-only" and e.mode_for(None) == "metadata-only"
    assert e.redactor.redact("TCK-42") == ("[REDACTED:TICKET]", {"TICKET": 1})
    assert not CaptureEnricher.from_settings(Settings()).active


# -- through the real recorder into SQLite ---------------------------------------


def test_recorder_stores_only_what_the_capture_mode_allows(tmp_path, enricher):
    engine = make_engine(f"sqlite:///{tmp_path}/k.db")
    migrate(engine)
    rec = Recorder(engine, tmp_path / "spill", batch_size=10, flush_interval_s=0.02)
    rec.enrichers.append(enricher)
    rec.start()
    try:
        pii = "jane@example.com", "7946 0958", "4111 1111 1111 1111", "10.0.0.9"
        sent = {}
        for alias in ("safe", "meta", "open"):
            t = make_trace(
                alias,
                status="error",
                error_message="bad card 4111 1111 1111 1111 from 10.0.0.9",
            )
            sent[alias] = t["id"]
            rec.record(t)
        assert rec.flush()
    finally:
        rec.stop()
    with engine.connect() as c:
        rows = {
            r.model: r
            for r in c.execute(
                sa.text(
                    "SELECT model, request_body, response_body, error_message, tags, "
                    "prompt_tokens FROM traces"
                )
            )
        }
    engine.dispose()
    assert set(rows) == {"safe", "meta", "open"}

    safe = rows["safe"]
    stored = " ".join([safe.request_body, safe.response_body, safe.error_message, safe.tags])
    assert not any(p in stored for p in pii)
    assert "[REDACTED:EMAIL]" in safe.request_body
    assert orjson.loads(safe.tags)["_redacted"] == "CREDIT_CARD:1,EMAIL:2,IPV4:1,PHONE:1"

    meta = rows["meta"]
    assert meta.request_body is None and meta.response_body is None
    assert not any(p in meta.error_message + meta.tags for p in pii)
    assert meta.error_message == "bad card [REDACTED:CREDIT_CARD] from [REDACTED:IPV4]"
    assert meta.prompt_tokens == 20

    full = rows["open"]
    assert "jane@example.com" in full.request_body and "7946 0958" in full.request_body
    assert "4111 1111 1111 1111" in full.error_message
    assert full.tags == '{"team":"support"}'


def test_overflow_spill_and_replay_are_redacted_too(tmp_path):
    """The queue-full path spills to disk: what lands there is already clean."""
    from keel._ids import new_id
    from keel.store.engine import make_engine, migrate
    from keel.store.recorder import Recorder

    engine = make_engine(f"sqlite:///{tmp_path}/k.db")
    migrate(engine)
    enricher = CaptureEnricher(default_mode="redacted", mode_by_alias={}, redactor=Redactor())
    rec = Recorder(engine, tmp_path / "spill", queue_size=1)
    rec.enrichers.append(enricher)
    for _ in range(3):  # writer not started: two of these overflow to the spill file
        rec.record(
            {
                "id": new_id(),
                "started_at_ms": 1,
                "duration_ms": 1.0,
                "endpoint": "chat",
                "model": "m",
                "status": "ok",
                "http_status": 200,
                "request_body": '{"q": "write to jane.doe@example.com"}',
            }
        )
    spilled = b"".join(p.read_bytes() for p in rec.spill_files())
    assert b"jane.doe@example.com" not in spilled and b"[REDACTED:EMAIL]" in spilled
    rec.start()
    rec.stop()
    with engine.connect() as c:
        bodies = [r[0] for r in c.exec_driver_sql("SELECT request_body FROM traces")]
    assert len(bodies) == 3 and all("jane.doe" not in b for b in bodies)
