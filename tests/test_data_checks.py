"""Dataset validation checks: each on a crafted good and bad dataset, the
report formats and `keel data validate` on files."""

from __future__ import annotations

import json
import sys
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from keel.data.checks import (
    CHECKS,
    Check,
    MinHasher,
    register_check,
    shingle_hashes,
    validate,
    word_hashes,
)
from keel.data.validate_cli import validate_command

WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
    "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()


def chat(user: str, answer: str = "Sure, here it is.", split: str | None = None, **extra):
    return {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ],
        "metadata": extra,
        "split": split,
    }


def sentence(seed: int, n: int = 60) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n))


GOOD_CHAT = [
    chat(f"Question number {i}: {sentence(i, 12)}", sentence(100 + i, 20)) for i in range(8)
]


def result(report, name):
    return next(r for r in report.results if r.name == name)


def run(rows, kind="chat", only=None, **options):
    opts = dict(options)
    if only:
        opts["only"] = [only]
    return validate(rows, kind, options=opts)


def rows_of(r) -> list[int]:
    return [e["row"] for e in r.examples]


# -- the good datasets are clean for every check ---------------------------------


def test_good_chat_dataset_is_clean():
    report = run(GOOD_CHAT, token_length={"model": "local"})
    assert report.ok
    assert all(r.count == 0 for r in report.results), report.to_text()
    names = {r.name for r in report.results}
    assert {"schema", "chat_format", "empty_fields", "invalid_utf8", "token_length"} <= names
    assert {"duplicates", "near_duplicates", "leakage", "pii", "label_balance"} <= names


def test_good_completion_and_eval_datasets_are_clean():
    comp = [{"prompt": sentence(i, 20), "completion": sentence(50 + i, 10)} for i in range(6)]
    assert all(r.count == 0 for r in run(comp, "completion").results)
    ev = [
        {"input": sentence(i, 15), "expected": ["pos", "neg"][i % 2], "metadata": {}, "split": None}
        for i in range(10)
    ]
    report = run(ev, "eval")
    assert all(r.count == 0 for r in report.results), report.to_text()
    assert result(report, "label_balance").details["classes"] == {"pos": 5, "neg": 5}


# -- each check catches its bad rows --------------------------------------------


def test_schema():
    bad = [
        GOOD_CHAT[0],
        {"messages": []},
        {"messages": [{"role": "user", "content": 3}]},
        {"messages": [{"content": "x"}]},
        {"messages": [{"role": "user", "content": "x"}], "metadata": "nope"},
        "not an object",
    ]
    r = result(run(bad, only="schema"), "schema")
    assert r.count == 5 and r.severity == "error"
    assert rows_of(r) == [1, 2, 3, 4, 5]
    assert "content" in r.examples[1]["reason"]
    comp = [{"prompt": "a", "completion": "b"}, {"prompt": "a"}]
    assert rows_of(result(run(comp, "completion", only="schema"), "schema")) == [1]
    ev = [{"input": {"q": 1}, "expected": None}, {"input": 5}, {"input": "x", "expected": 3}]
    assert rows_of(result(run(ev, "eval", only="schema"), "schema")) == [1, 2]


def test_chat_format():
    def msgs(*pairs, **kw):
        return {"messages": [{"role": r, "content": c, **kw} for r, c in pairs]}

    tool_call = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "1"},
            {"role": "assistant", "content": "Sunny."},
        ]
    }
    good = [GOOD_CHAT[0], tool_call, msgs(("user", "a"), ("assistant", "b"))]
    assert result(run(good, only="chat_format"), "chat_format").count == 0
    bad = [
        msgs(("user", "a"), ("robot", "b")),
        msgs(("assistant", "a"), ("user", "b"), ("assistant", "c")),
        msgs(("user", "a"), ("user", "b"), ("assistant", "c")),
        msgs(("user", "a"), ("assistant", "b"), ("user", "c")),
        msgs(("user", "a"), ("tool", "b"), ("assistant", "c")),
    ]
    r = result(run(bad, only="chat_format"), "chat_format")
    assert r.count == 5
    reasons = [e["reason"] for e in r.examples]
    assert "invalid role 'robot'" in reasons[0]
    assert "first turn" in reasons[1]
    assert "two user turns" in reasons[2]
    assert "end with an assistant" in reasons[3]
    assert "tool message" in reasons[4]
    # Not training data: ending on a user turn is fine.
    r = result(run(bad[3:4], only="chat_format", chat_format={"training": False}), "chat_format")
    assert r.count == 0


def test_empty_fields():
    bad = [
        GOOD_CHAT[0],
        chat("   \n"),
        chat("hi", ""),
    ]
    r = result(run(bad, only="empty_fields"), "empty_fields")
    assert rows_of(r) == [1, 2]
    assert "messages[1].content (user)" in r.examples[0]["reason"]
    comp = [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": " \t"}]
    assert rows_of(result(run(comp, "completion", only="empty_fields"), "empty_fields")) == [1]


def test_invalid_utf8():
    bad = [
        GOOD_CHAT[0],
        chat("caf\ufffd au lait"),
        chat("broken \ud83d surrogate"),
        chat("fine: café, 日本語, 🙂"),
    ]
    r = result(run(bad, only="invalid_utf8"), "invalid_utf8")
    assert rows_of(r) == [1, 2]
    assert "U+FFFD" in r.examples[0]["reason"] and "U+D83D" in r.examples[1]["reason"]


def test_token_length_with_the_local_tokenizer():
    long = chat(" ".join(["tokens"] * 300))
    r = result(
        run(
            [GOOD_CHAT[0], long],
            only="token_length",
            token_length={"model": "local", "max_tokens": 200},
        ),
        "token_length",
    )
    assert rows_of(r) == [1]
    assert r.details["estimated"] is False and "llama.cpp" in r.details["tokenizer"]
    assert 300 < r.examples[0]["tokens"] < 330
    # The default window is the model's own (SmolLM2: 8192).
    r = result(run([long], only="token_length", token_length={"model": "local"}), "token_length")
    assert r.count == 0 and r.details["max_tokens"] == 8192


def test_local_token_counts_are_exact():
    from keel.data.checks import resolve_tokenizer

    tok = resolve_tokenizer("local")
    rng = np.random.default_rng(3)
    alphabet = list("abcdefgh ijk  \n\n\t0123456789,.;!?'\"éü—中文🙂<|>_-")
    texts = ["".join(rng.choice(alphabet, rng.integers(0, 120))) for _ in range(400)]
    texts += ["I'm sure it's 2024-01-05: $3.50!!  ok\n\n  indented\tcode()"] * 2
    want = [len(tok.llm.tokenize(t.encode(), add_bos=False, special=False)) for t in texts]
    assert tok.count_batch(texts) == want


def test_token_length_estimate():
    rows = [chat("x" * 400), chat("short")]
    r = result(run(rows, only="token_length", token_length={"max_tokens": 50}), "token_length")
    assert rows_of(r) == [0]
    assert r.details["estimated"] is True and r.details["tokenizer"].startswith("estimate")
    # No model and no limit: counted, nothing fails.
    r = result(run(rows, only="token_length"), "token_length")
    assert r.count == 0 and r.details["max_tokens"] is None and r.details["total_tokens"] > 100


def test_token_length_unknown_model_needs_a_limit():
    from keel.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="max-tokens"):
        run(GOOD_CHAT, only="token_length", token_length={"model": "my-own-model"})


def test_duplicates():
    rows = [*GOOD_CHAT[:3], GOOD_CHAT[1], GOOD_CHAT[1]]
    r = result(run(rows, only="duplicates"), "duplicates")
    assert r.severity == "warning" and rows_of(r) == [3, 4]
    assert r.examples[0]["duplicate_of"] == 1


def test_near_duplicates_across_small_edits():
    base = [sentence(i, 80) for i in range(30)]
    rows = [chat(t) for t in base]
    edited = base[4].split()
    edited[40] = "EDITED"
    rows.append(chat(" ".join(edited)))  # one word changed
    rows.append(chat(base[9] + " and one more"))  # words appended
    rows.append(chat(base[4]))  # exact: the duplicates check's, not this one's
    r = result(run(rows, only="near_duplicates"), "near_duplicates")
    clusters = sorted(e["cluster"] for e in r.examples)
    assert clusters == [[4, 30], [9, 31]], r.examples
    assert r.count == 2 and r.details["clusters"] == 2
    clean = result(run([chat(t) for t in base], only="near_duplicates"), "near_duplicates")
    assert clean.count == 0


def test_minhash_signatures_equal_datasketch():
    from datasketch import MinHash

    texts = [sentence(i, 20) for i in range(5)] + ["one two"]
    hashes = [word_hashes(t) for t in texts]
    sigs = MinHasher(64).signatures([h for hs in hashes for h in hs], [len(h) for h in hashes])
    for hs, sig in zip(hashes, sigs, strict=True):
        m = MinHash(num_perm=64, scheme="affine32", hashfunc=lambda x: x)
        m.update_batch([int(v) for v in shingle_hashes(np.array(hs, dtype=np.uint32))])
        assert np.array_equal(m.hashvalues, sig)


def test_leakage():
    rows = [
        chat("What is the capital of France?", split="train"),
        chat("How do I boil an egg?", split="train"),
        chat("What is the capital of France?", "Paris!", split="validation"),
        chat("Something new", split="test"),
        chat("How do I boil an egg?", split=None),
    ]
    r = result(run(rows, only="leakage"), "leakage")
    assert rows_of(r) == [2] and r.examples[0]["train_row"] == 0
    assert r.details["by_split"] == {"validation": 1}
    clean = [chat("a q", split="train"), chat("another q", split="test")]
    assert result(run(clean, only="leakage"), "leakage").count == 0


def test_pii():
    rows = [GOOD_CHAT[0], chat("mail me at jane.doe@example.com or +1 415 555 0100"), GOOD_CHAT[1]]
    r = result(run(rows, only="pii"), "pii")
    assert r.severity == "warning" and rows_of(r) == [1]
    assert r.details["by_kind"]["EMAIL"] == 1


def test_label_balance():
    ev = [{"input": f"q{i}", "metadata": {"label": "spam" if i < 2 else "ham"}} for i in range(40)]
    r = result(run(ev, "eval", only="label_balance"), "label_balance")
    assert r.count == 1 and rows_of(r) == [0, 1] and "spam" in r.examples[0]["reason"]
    one = [{"input": f"q{i}", "expected": {"label": "yes"}} for i in range(5)]
    r = result(run(one, "eval", only="label_balance"), "label_balance")
    assert r.count == 1 and "only one class" in r.examples[0]["reason"]
    free_text = [{"input": f"q{i}", "expected": f"a long free-text answer {i}"} for i in range(9)]
    assert result(run(free_text, "eval", only="label_balance"), "label_balance").count == 0


# -- user checks ------------------------------------------------------------------


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(
        textwrap.dedent(
            """
            def no_foo(kind, rows):
                bad = [i for i, r in enumerate(rows) if "foo" in str(r)]
                return {"count": len(bad), "severity": "warning",
                        "examples": [{"row": i, "reason": "mentions foo"} for i in bad]}

            def boom(kind, rows):
                raise RuntimeError("kaboom")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_checks"
    sys.modules.pop("my_checks", None)


def test_user_check_by_module_function(user_module):
    rows = [chat("hello"), chat("foo bar")]
    report = validate(rows, "chat", options={"only": ["schema"]}, user_checks=["my_checks:no_foo"])
    r = result(report, "my_checks:no_foo")
    assert r.severity == "warning" and rows_of(r) == [1]
    assert report.ok  # a warning does not fail the report


def test_crashing_and_missing_user_checks_are_error_results(user_module):
    report = validate(
        GOOD_CHAT,
        "chat",
        options={"only": ["schema"]},
        user_checks=["my_checks:boom", "no_such_module:fn"],
    )
    boom = result(report, "my_checks:boom")
    assert boom.severity == "error" and "kaboom" in boom.details["error"]
    assert "cannot load" in result(report, "no_such_module:fn").details["error"]
    assert not report.ok


def test_registered_check_class():
    @register_check
    class ShortAnswers(Check):
        name = "test_short_answers"
        severity = "warning"
        applies_to = ("chat",)

        def feed(self, i, row):
            if len(row["messages"][-1]["content"]) < 5:
                self.flag(i, "short answer")

    try:
        report = run([chat("q", "ok"), *GOOD_CHAT[:2]])
        assert rows_of(result(report, "test_short_answers")) == [0]
    finally:
        CHECKS.pop("test_short_answers")


# -- the report ---------------------------------------------------------------------


BAD_CHAT = [*GOOD_CHAT[:3], GOOD_CHAT[0], chat("email bob@example.com"), {"messages": []}]


def test_report_text_and_json():
    report = run(BAD_CHAT)
    assert not report.ok
    text = report.to_text()
    assert text.startswith("Validation of 6 chat rows: FAILED")
    assert "✗ schema" in text and "! duplicates" in text and "✓ leakage" in text
    assert "row 3: same as row 0" in text
    d = json.loads(json.dumps(report.to_dict()))
    assert d["ok"] is False and d["rows"] == 6 and d["errors"] >= 1
    assert {r["name"] for r in d["results"]} >= set(CHECKS) - {"label_balance"} | {"label_balance"}


def test_report_html():
    report = run(BAD_CHAT)
    html = report.to_html()

    class P(HTMLParser):
        ids: list[str] = []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if a.get("id", "").startswith("check-"):
                self.ids.append(a["id"][6:])
            assert tag not in ("script", "link") and "src" not in a

    p = P()
    p.feed(html)
    assert p.ids == [r.name for r in report.results]
    assert "bob@example.com" not in html  # examples carry reasons, not the data


# -- the CLI -------------------------------------------------------------------------


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_exit_codes_and_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./keel.yaml
    runner = CliRunner()
    good = write_jsonl(tmp_path / "good.jsonl", GOOD_CHAT)
    bad = write_jsonl(tmp_path / "bad.jsonl", BAD_CHAT)

    res = runner.invoke(validate_command, [str(good), "--max-tokens", "4096"])
    assert res.exit_code == 0, res.output
    assert "PASSED" in res.output

    html = tmp_path / "r.html"
    res = runner.invoke(validate_command, [str(bad), "--json", "--html", str(html)])
    assert res.exit_code == 1, res.output
    d = json.loads(res.output)
    assert d["ok"] is False and d["kind"] == "chat"
    assert "<html" in html.read_text()

    # Warnings only: 0 by default, 1 with --fail-on warning.
    dup = write_jsonl(tmp_path / "dup.jsonl", [GOOD_CHAT[0], GOOD_CHAT[0]])
    assert runner.invoke(validate_command, [str(dup)]).exit_code == 0
    assert runner.invoke(validate_command, [str(dup), "--fail-on", "warning"]).exit_code == 1

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": []}\n{not json\n')
    res = runner.invoke(validate_command, [str(broken)])
    assert res.exit_code == 2 and "broken.jsonl line 2" in res.output
    res = runner.invoke(validate_command, [str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2 and "no such file" in res.output


def test_cli_reads_csv_and_parquet_and_bad_bytes(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("prompt,completion,split\nhello there,general kenobi,train\nq,,test\n")
    res = runner.invoke(validate_command, [str(csv_path), "--json"])
    assert res.exit_code == 1
    d = json.loads(res.output)
    assert d["kind"] == "completion"
    assert next(r for r in d["results"] if r["name"] == "empty_fields")["count"] == 1

    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"input": "2+2", "expected": "4"}] * 2), pq_path)
    res = runner.invoke(validate_command, [str(pq_path), "--json"])
    d = json.loads(res.output)
    assert d["kind"] == "eval" and res.exit_code == 0
    assert next(r for r in d["results"] if r["name"] == "duplicates")["count"] == 1

    raw = tmp_path / "bytes.jsonl"
    raw.write_bytes(b'{"prompt": "caf\xe9", "completion": "ok"}\n')
    res = runner.invoke(validate_command, [str(raw)])
    assert res.exit_code == 1 and "invalid_utf8" in res.output

    (tmp_path / "x.txt").write_text("hi")
    res = runner.invoke(validate_command, [str(tmp_path / "x.txt")])
    assert res.exit_code == 2 and "unsupported file type" in res.output


def test_cli_user_checks_from_keel_yaml(tmp_path, monkeypatch, user_module):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keel.yaml").write_text("data:\n  checks: ['my_checks:boom']\n")
    good = write_jsonl(tmp_path / "good.jsonl", GOOD_CHAT)
    res = CliRunner().invoke(validate_command, [str(good), "--config", "keel.yaml"])
    assert res.exit_code == 1 and "kaboom" in res.output


def test_validate_a_stored_version_records_its_summary(tmp_path, monkeypatch):
    import json as _json

    import sqlalchemy as sa
    from click.testing import CliRunner as _Runner

    from keel.cli import cli as keel_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "keel.yaml").write_text(f"data_dir: {tmp_path / 'data'}\n")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
        for i in range(5)
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(_json.dumps(r) for r in rows) + "\n")
    r = _Runner().invoke(keel_cli, ["data", "import", "d.jsonl", "--name", "qa", "--kind", "chat"])
    assert r.exit_code == 0, r.output
    r = _Runner().invoke(keel_cli, ["data", "validate", "qa"])
    assert r.exit_code == 0, r.output
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'data' / 'keel.db'}")
    with engine.connect() as c:
        (summary,) = c.execute(sa.text("SELECT validation FROM dataset_versions")).one()
    stored = _json.loads(summary)
    assert stored["ok"] is True and stored["rows"] == 5 and "chat_format" in stored["checks"]
