"""Datasets: streaming import, content-hash versions, recorded preparation, export, API, CLI."""

from __future__ import annotations

import csv
import json
import time
import tracemalloc
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import fsspec
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from keel._ids import new_id
from keel.data import DatasetError, DatasetStore, from_traces, prepare
from keel.data.api import make_router
from keel.data.cli import data as data_cli
from keel.data.io import canonical_rows, parse_mapping, read_file
from keel.errors import Conflict, KeelError, NotFound
from keel.gateway.routes import error_response
from keel.store.engine import make_engine, migrate
from keel.store.recorder import Recorder


@pytest.fixture
def engine(tmp_path: Path) -> Any:
    e = make_engine(f"sqlite:///{tmp_path / 'keel.db'}")
    migrate(e)
    yield e
    e.dispose()


@pytest.fixture
def store(engine: Any, tmp_path: Path) -> DatasetStore:
    return DatasetStore(engine, str(tmp_path / "artifacts"))


def chat_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer {i}"},
            ],
            "metadata": {"topic": ["billing", "shipping", "returns"][i % 3]},
        }
        for i in range(start, start + n)
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def import_file(store: DatasetStore, name: str, kind: str, path: Path, **kw: Any) -> Any:
    mapping = parse_mapping(kw.pop("maps", None))
    rows = canonical_rows(read_file(str(path), mapping=mapping, **kw), kind)
    return store.write_version(name, kind, rows, source={"path": str(path)}, created_by="test")


def version_files(store: DatasetStore) -> list[str]:
    return sorted(p for p in store.fs.find(store._root_path) if p.endswith(".parquet"))


# -- import -------------------------------------------------------------------------


def test_import_jsonl_chat_and_read_back(store: DatasetStore, tmp_path: Path) -> None:
    rows = chat_rows(5)
    rows[0]["extra_col"] = 7  # unknown columns go to metadata
    v = import_file(store, "support", "chat", write_jsonl(tmp_path / "a.jsonl", rows))
    assert v.created and v.rows == 5 and v.kind == "chat" and len(v.id) == 64
    assert v.uri.endswith(f"/datasets/support/{v.id}")
    back = list(store.read_rows(v.id))
    assert back[0]["metadata"] == {"topic": "billing", "extra_col": 7}
    assert back[1] == {**rows[1], "split": None}
    assert version_files(store) == [f"{store._path(v.uri)}/data-00000.parquet"]


def test_same_content_from_jsonl_csv_parquet_has_same_id(
    store: DatasetStore, tmp_path: Path
) -> None:
    data = [{"question": f"q{i}", "answer": f"a{i}", "split": "train"} for i in range(4)]
    jl = write_jsonl(tmp_path / "e.jsonl", data)
    cs = tmp_path / "e.csv"
    with cs.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["question", "answer", "split"])
        w.writeheader()
        w.writerows(data)
    pq_path = tmp_path / "e.parquet"
    pq.write_table(pa.Table.from_pylist(data), pq_path)
    maps = ["input=question", "expected=answer"]
    v1 = import_file(store, "qa", "eval", jl, maps=maps)
    v2 = import_file(store, "qa", "eval", cs, maps=maps)
    v3 = import_file(store, "qa", "eval", pq_path, maps=maps)
    assert v1.created and not v2.created and not v3.created
    assert v1.id == v2.id == v3.id
    assert v1.splits == {"train": 4}
    assert next(store.read_rows(v1)) == {
        "input": "q0",
        "expected": "a0",
        "metadata": {},
        "split": "train",
    }
    assert len(store.versions("qa")) == 1 and len(version_files(store)) == 1


def test_csv_parses_json_cells_for_chat_and_completion(store: DatasetStore, tmp_path: Path) -> None:
    p = tmp_path / "c.csv"
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages", "metadata"])
        w.writerow([json.dumps(chat_rows(1)[0]["messages"]), '{"topic": "billing"}'])
    v = import_file(store, "c", "chat", p)
    assert list(store.read_rows(v)) == [{**chat_rows(1)[0], "split": None}]
    p2 = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": 4}])
    v2 = import_file(store, "comp", "completion", p2)
    assert next(store.read_rows(v2))["completion"] == "4"


def test_malformed_jsonl_line_names_it_and_writes_nothing(
    store: DatasetStore, tmp_path: Path
) -> None:
    p = tmp_path / "bad.jsonl"
    lines = [orjson.dumps(r).decode() for r in chat_rows(3)]
    lines.insert(2, '{"messages": [oops')
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="line 3"):
        import_file(store, "bad", "chat", p)
    assert store.list() == []
    assert version_files(store) == []
    assert not [x for x in store.fs.find(store._root_path) if "_staging" in x]


def test_unmappable_row_names_row_and_field(store: DatasetStore, tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(ValueError, match="row 2: missing field 'completion'"):
        import_file(store, "x", "completion", p)
    with pytest.raises(DatasetError, match="'messages' must be a list"):
        import_file(store, "y", "chat", write_jsonl(tmp_path / "y.jsonl", [{"messages": "hi"}]))
    with pytest.raises(DatasetError, match="no such file"):
        import_file(store, "z", "chat", tmp_path / "missing.jsonl")


def test_kind_conflict_and_refs(store: DatasetStore, tmp_path: Path) -> None:
    v = import_file(store, "d", "chat", write_jsonl(tmp_path / "a.jsonl", chat_rows(3)))
    with pytest.raises(Conflict, match="holds chat rows"):
        store.write_version("d", "eval", iter([]))
    assert store.get("d").id == v.id
    assert store.get(f"d@{v.id[:8]}").id == v.id
    assert store.get(v.id[:10]).id == v.id
    with pytest.raises(NotFound):
        store.get("nope")
    with pytest.raises(NotFound):
        store.get("d@ffffffff")


def test_empty_version(store: DatasetStore) -> None:
    v = store.write_version("empty", "eval", iter([]))
    assert v.rows == 0 and list(store.read_rows(v)) == []


# -- preparation ----------------------------------------------------------------------


def test_prepare_records_lineage_and_is_deterministic(store: DatasetStore) -> None:
    rows = chat_rows(50) + chat_rows(10)  # 10 exact duplicates
    base = store.write_version("s", "chat", iter(rows), created_by="alice")
    steps = ["normalize", "dedupe", "split:train=0.8,validation=0.1,test=0.1,seed=42"]
    v = prepare(store, "s", steps, created_by="bob")
    assert v.created and v.parent_id == base.id and v.rows == 50
    assert [s["step"] for s in v.steps] == ["normalize", "dedupe", "split"]
    assert v.steps[2]["params"] == {
        "train": 0.8,
        "validation": 0.1,
        "test": 0.1,
        "seed": 42,
        "stratify_by": None,
    }
    assert v.created_by == "bob" and v.source == {"type": "prepare", "from": base.id}
    stored = store.get(v.id[:12])
    assert stored.steps == v.steps and stored.parent_id == base.id
    again = prepare(store, base.id, steps, created_by="carol")
    assert again.id == v.id and not again.created
    other = prepare(store, base.id, [*steps[:2], "split:seed=43"], created_by="bob")
    assert other.id != v.id


def test_normalize_step() -> None:
    from keel.data.prepare import build_steps, run_steps

    row = {
        "messages": [{"role": "user", "content": "  Cafe\u0301 \t ok\r\n\n\n\nbye  "}],
        "metadata": {"note": "  kept  "},
        "split": None,
    }
    (out,) = run_steps(lambda: iter([row]), build_steps("chat", ["normalize"]))
    assert out["messages"][0]["content"] == "Caf\u00e9 ok\n\nbye"
    assert out["metadata"] == {"note": "  kept  "}
    (ev,) = run_steps(
        lambda: iter([{"input": {"q": " a  b "}, "expected": " c ", "metadata": {}}]),
        build_steps("eval", ["normalize:whitespace=false"]),
    )
    assert ev["input"] == {"q": " a  b "}


def test_dedupe_redact_filter_steps(store: DatasetStore) -> None:
    rows = [
        {"prompt": "mail bob@example.com", "completion": "ok", "metadata": {"i": 1}},
        {"prompt": "mail bob@example.com", "completion": "ok", "metadata": {"i": 2}},
        {"prompt": "x" * 400, "completion": "y", "metadata": {}},
        {"prompt": "hi", "completion": "", "metadata": {}},
    ]
    store.write_version("c", "completion", iter(rows))
    v = prepare(store, "c", ["dedupe", "redact", "filter_length:min_chars=3,max_tokens=50"])
    got = list(store.read_rows(v))
    assert got == [
        {
            "prompt": "mail [REDACTED:EMAIL]",
            "completion": "ok",
            "metadata": {"i": 1},
            "split": None,
        }
    ]
    kept_meta = prepare(store, "c@" + v.parent_id[:8], ["dedupe:ignore_metadata=false"])
    assert kept_meta.rows == 4 and kept_meta.id == v.parent_id  # nothing changed: same version
    with pytest.raises(DatasetError, match="set at least one"):
        prepare(store, "c", ["filter_length"])
    with pytest.raises(DatasetError, match="unknown step 'shuffle'"):
        prepare(store, "c", ["shuffle"])
    with pytest.raises(DatasetError, match=r"split\): Value error, train \+ validation"):
        prepare(store, "c", ["split:train=0.5,validation=0.1,test=0.1"])
    with pytest.raises(DatasetError, match="Extra inputs"):
        prepare(store, "c", [{"step": "dedupe", "params": {"by": "x"}}])


def test_split_is_deterministic_with_fractions_within_tolerance(store: DatasetStore) -> None:
    store.write_version("big", "chat", iter(chat_rows(3000)))
    spec = {"split": {"train": 0.7, "validation": 0.2, "test": 0.1, "seed": 7}}
    v = prepare(store, "big", [spec])
    counts = v.splits
    assert sum(counts.values()) == 3000
    for name, frac in (("train", 0.7), ("validation", 0.2), ("test", 0.1)):
        assert abs(counts[name] / 3000 - frac) < 0.03, counts
    a = [r["split"] for r in store.read_rows(v)]
    # Same seed, rows in another order (a different version): each row keeps its split.
    reordered = list(reversed(chat_rows(3000)))
    store.write_version("big2", "chat", iter(reordered))
    b = [r["split"] for r in store.read_rows(prepare(store, "big2", [spec]))]
    assert a == list(reversed(b))
    other_seed = prepare(store, "big", ["split:train=0.7,validation=0.2,test=0.1,seed=8"])
    assert [r["split"] for r in store.read_rows(other_seed)] != a


def test_stratified_split_keeps_proportions_per_stratum(store: DatasetStore) -> None:
    rows = chat_rows(1000)
    for i, r in enumerate(rows):  # a skewed label: 90 % a, 10 % b
        r["metadata"] = {"label": "b" if i % 10 == 0 else "a"}
    store.write_version("strat", "chat", iter(rows))
    step = "split:train=0.8,validation=0.1,test=0.1,seed=1,stratify_by=label"
    v = prepare(store, "strat", [step])
    per: Counter[tuple[str, str]] = Counter(
        (r["metadata"]["label"], r["split"]) for r in store.read_rows(v)
    )
    assert per[("b", "train")] == 80 and per[("b", "validation")] == 10 and per[("b", "test")] == 10
    assert per[("a", "train")] == 720 and per[("a", "test")] == 90
    assert prepare(store, "strat@" + v.parent_id[:8], [step]).id == v.id


# -- diff and export --------------------------------------------------------------------


def test_diff(store: DatasetStore) -> None:
    a = store.write_version("d", "chat", iter(chat_rows(10)))
    b = store.write_version("d", "chat", iter(chat_rows(8, start=4)))  # 4..11
    d = store.diff(a.id, b.id)
    assert (d["added"], d["removed"], d["rows_a"], d["rows_b"]) == (2, 4, 10, 8)
    assert d["examples_added"][0]["messages"][0]["content"] == "question 10"
    assert len(d["examples_removed"]) == 3


def test_exports(store: DatasetStore, tmp_path: Path) -> None:
    store.write_version("e", "chat", iter(chat_rows(20)))
    v = prepare(store, "e", ["split:train=0.5,validation=0.5,test=0,seed=3"])
    one = store.export(v, "openai-jsonl", str(tmp_path / "train.jsonl"), split="train")
    lines = [json.loads(x) for x in Path(one[0]).read_text().splitlines()]
    assert len(lines) == v.splits["train"]
    assert set(lines[0]) == {"messages"} and lines[0]["messages"][0]["role"] == "user"
    per_split = store.export(v, "openai-jsonl", str(tmp_path / "ft"))
    assert sorted(Path(p).name for p in per_split) == ["train.jsonl", "validation.jsonl"]
    files = store.export(v, "jsonl", str(tmp_path / "all.jsonl"), split="validation")
    assert all(
        json.loads(x)["split"] == "validation" for x in Path(files[0]).read_text().splitlines()
    )

    store.export(v, "hf", str(tmp_path / "hf"))
    info = json.loads((tmp_path / "hf" / "dataset_info.json").read_text())
    assert info["splits"]["train"]["num_examples"] == v.splits["train"]
    t = pq.read_table(tmp_path / "hf" / "train" / "data-00000.parquet")
    assert t.num_rows == v.splits["train"]
    assert t.column("messages").to_pylist()[0][0]["role"] == "user"
    assert json.loads(t.column("metadata")[0].as_py())["topic"] in {
        "billing",
        "shipping",
        "returns",
    }

    store.export(v, "parquet", str(tmp_path / "out.parquet"))
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 20

    ev = store.write_version("ev", "eval", iter([{"input": {"q": 1}, "expected": None}]))
    with pytest.raises(DatasetError, match="no OpenAI fine-tuning form"):
        store.export(ev, "openai-jsonl", str(tmp_path / "ev.jsonl"))
    store.export(ev, "hf", str(tmp_path / "hf-ev"))
    assert pq.read_table(tmp_path / "hf-ev" / "train").column("input").to_pylist() == ['{"q":1}']


def test_memory_artifact_root(engine: Any) -> None:
    root = f"memory://keel-test-{uuid.uuid4().hex}"
    s = DatasetStore(engine, root)
    v = s.write_version("m", "chat", iter(chat_rows(30)))
    assert v.uri == f"{root}/datasets/m/{v.id}"
    fs = fsspec.filesystem("memory")
    assert fs.exists(f"{s._path(v.uri)}/data-00000.parquet")
    v2 = prepare(s, "m", ["dedupe", "split:seed=1"])
    assert sum(v2.splits.values()) == 30
    assert len(list(s.read_rows(v2, split="train"))) == v2.splits["train"]
    s.export(v2, "hf", f"{root}/export")
    assert fs.exists(f"{s._path(root)}/export/dataset_info.json")
    fs.rm(s._path(root), recursive=True)


# -- traces -------------------------------------------------------------------------------


def _trace(i: int, *, model: str, status: str = "ok", stream: bool = False) -> dict[str, Any]:
    req = {"model": model, "messages": [{"role": "user", "content": f"hello {i}"}]}
    msg = {"role": "assistant", "content": f"reply {i}"}
    resp = {"message": msg, "finish_reason": "stop"} if stream else {"choices": [{"message": msg}]}
    return {
        "id": new_id(),
        "started_at_ms": int(time.time() * 1000) - (10 - i) * 1000,
        "duration_ms": 12.0,
        "ttft_ms": None,
        "endpoint": "chat",
        "model": model,
        "provider": "fake",
        "upstream_model": "fake",
        "status": status,
        "http_status": 200 if status == "ok" else 500,
        "stream": stream,
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "tokens_estimated": False,
        "user_id": "u1",
        "feature": "support" if i % 2 else "search",
        "request_body": orjson.dumps(req).decode(),
        "response_body": orjson.dumps(resp).decode() if status == "ok" else None,
    }


def test_from_traces(store: DatasetStore, engine: Any, tmp_path: Path) -> None:
    rec = Recorder(engine, tmp_path / "spill", flush_interval_s=0.02)
    rec.start()
    for i in range(6):
        rec.record(_trace(i, model="gpt", stream=i == 3))
    rec.record(_trace(6, model="gpt", status="error"))
    rec.record(_trace(7, model="other"))
    truncated = _trace(8, model="gpt")
    truncated["response_body"] = orjson.dumps({"_keel_truncated": True, "head": "{"}).decode()
    rec.record(truncated)
    assert rec.flush(10)
    rec.stop()

    stats: dict[str, int] = {}
    rows = list(from_traces(engine, filters={"model": "gpt"}, since=0, stats=stats))
    assert len(rows) == 6 and stats["skipped"] == 1
    assert rows[3]["messages"] == [
        {"role": "user", "content": "hello 3"},
        {"role": "assistant", "content": "reply 3"},
    ]
    assert rows[0]["metadata"]["model"] == "gpt" and rows[0]["metadata"]["user"] == "u1"
    support = list(from_traces(engine, filters={"model": "gpt", "feature": "support"}))
    assert len(support) == 3
    ev = next(from_traces(engine, filters={"model": "other"}, kind="eval"))
    assert ev["input"] == {"messages": [{"role": "user", "content": "hello 7"}]}
    assert ev["expected"] == "reply 7"
    assert list(from_traces(engine, since=int(time.time() * 1000) + 60_000)) == []
    with pytest.raises(DatasetError, match="unknown trace filter"):
        list(from_traces(engine, filters={"colour": "red"}))
    v = store.write_version("prod", "chat", from_traces(engine, filters={"model": "gpt"}))
    assert v.rows == 6


# -- API -----------------------------------------------------------------------------------


def test_api(store: DatasetStore) -> None:
    a = store.write_version("api", "chat", iter(chat_rows(12)), created_by="t")
    b = prepare(store, "api", ["split:seed=2"])
    app = FastAPI()

    @app.exception_handler(KeelError)
    async def _err(request: Request, exc: KeelError) -> Any:
        return error_response(exc)

    app.include_router(make_router(store))
    with TestClient(app) as c:
        body = c.get("/api/datasets").json()
        assert body["data"][0]["name"] == "api" and body["data"][0]["versions"] == 2
        assert body["data"][0]["latest"]["id"] == b.id
        detail = c.get("/api/datasets/api").json()
        assert [v["id"] for v in detail["versions"]] == [b.id, a.id]
        assert detail["versions"][0]["steps"][0]["step"] == "split"
        assert detail["versions"][0]["parent_id"] == a.id
        one = c.get(f"/api/datasets/api/versions/{b.id[:10]}", params={"limit": 5}).json()
        assert one["version"]["id"] == b.id and len(one["preview"]) == 5
        assert one["preview"][0]["split"] in {"train", "validation", "test"}
        d = c.get("/api/datasets/api/diff", params={"a": a.id[:8], "b": b.id[:8]}).json()
        assert d["added"] == 0 and d["removed"] == 0 and d["rows_b"] == 12
        r = c.get("/api/datasets/nope")
        assert r.status_code == 404 and "no dataset" in r.json()["error"]["message"]
        assert c.get("/api/datasets/api/versions/ffffffff").status_code == 404


# -- CLI ---------------------------------------------------------------------------------------


def test_cli(tmp_path: Path) -> None:
    cfg = tmp_path / "keel.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\nlocal:\n  enabled: false\n")
    src = write_jsonl(tmp_path / "in.jsonl", chat_rows(40) + chat_rows(5))
    r = CliRunner()

    def run(*args: str, code: int = 0) -> str:
        res = r.invoke(data_cli, [*args, "--config", str(cfg)])
        assert res.exit_code == code, res.output
        return res.output

    out = run("import", str(src), "--name", "cli", "--kind", "chat", "--quiet")
    assert "created cli@" in out and "45 rows" in out
    assert "unchanged" in run("import", str(src), "--name", "cli", "--kind", "chat", "--quiet")
    steps = tmp_path / "steps.yaml"
    steps.write_text("- dedupe\n- step: split\n  params: {train: 0.5, validation: 0.5, test: 0}\n")
    out = run("prepare", "cli", "--step", "normalize", "--steps-file", str(steps), "--quiet")
    assert "40 rows" in out and "train:" in out
    assert "cli" in run("list") and "chat" in run("list")
    show = run("show", "cli")
    assert "step 3   split" in show and "parent" in show
    parent = show.split("parent")[1].split()[0]
    diff = run("diff", "cli@" + parent[:10], "cli")
    # Only duplicates went: by content (a set) nothing was added or removed.
    assert "(45 rows)" in diff and "(40 rows)" in diff and "+0 added, -0 removed" in diff
    out = run("export", "cli", "--format", "openai-jsonl", "--out", str(tmp_path / "ft"), "--quiet")
    assert "train.jsonl" in out and (tmp_path / "ft" / "validation.jsonl").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\nnot json\n')
    err = run("import", str(bad), "--name", "bad", "--kind", "chat", "--quiet", code=1)
    assert "line 2" in err and "Traceback" not in err
    assert "unknown step" in run("prepare", "cli", "--step", "shuffle", code=1)
    assert "no dataset" in run("show", "missing", code=1)
    assert "--filter takes" in run("from-traces", "--name", "t", "--filter", "oops", code=1)
    out = run("from-traces", "--name", "t", "--filter", "model=gpt", "--since", "7d", "--quiet")
    assert "0 rows" in out


# -- streaming ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_million_row_jsonl_streams_with_bounded_memory(store: DatasetStore, tmp_path: Path) -> None:
    p = tmp_path / "big.jsonl"
    with p.open("wb") as f:
        for i in range(0, 1_000_000, 10_000):
            f.write(
                b"".join(
                    b'{"messages":[{"role":"user","content":"question number %d"},'
                    b'{"role":"assistant","content":"an answer"}],"metadata":{"i":%d}}\n' % (j, j)
                    for j in range(i, i + 10_000)
                )
            )
    assert p.stat().st_size > 50_000_000
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        v = import_file(store, "big", "chat", p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert v.rows == 1_000_000
    assert peak - base < 100 * 1024 * 1024, f"peak growth {(peak - base) / 1e6:.0f} MB"
    assert sum(1 for _ in store.read_texts(v)) == 1_000_000
