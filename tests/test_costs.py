"""Costs: hand-computed prices of OpenAI and Anthropic usage, the catalog's rules,
the reports API on a real Keel, and `keel costs`."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from conftest import KeelServer, make_settings
from keel._ids import new_id
from keel.config import PriceSettings
from keel.costs import PriceCatalog, Pricer
from keel.costs.catalog import load_catalog
from keel.costs.cli import costs
from keel.costs.reports import linear_fit
from keel.errors import ConfigError
from keel.gateway.calls import Attribution, Call, make_trace

KINDS = {"oai": "openai", "azure": "openai", "claude": "anthropic", "vllm": "openai"}
NOW = int(time.time() * 1000)
DAY = 86_400_000


def ms(date: str) -> int:
    return int(datetime.fromisoformat(date).replace(tzinfo=UTC).timestamp() * 1000)


def catalog(*prices: dict[str, Any], include_catalog: bool = True) -> PriceCatalog:
    return PriceCatalog.from_settings(
        [PriceSettings.model_validate(p) for p in prices], KINDS, include_catalog=include_catalog
    )


def openai_trace(usage: dict[str, Any], *, provider: str, model: str) -> dict[str, Any]:
    """A trace built by the gateway's own code from an OpenAI usage object."""
    return dict(
        make_trace(
            Call("chat", None),
            model="alias",
            provider=provider,
            upstream_model=model,
            attribution=Attribution(),
            stream=False,
            http_status=200,
            request_body=None,
            response_body=None,
            usage=usage,
        )
    )


# -- prices of one call ----------------------------------------------------------


def test_openai_usage_with_cached_and_reasoning_tokens():
    usage = {
        "prompt_tokens": 2000,
        "completion_tokens": 1500,
        "total_tokens": 3500,
        "prompt_tokens_details": {"cached_tokens": 1200, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 1000, "audio_tokens": 0},
    }
    pricer = Pricer(catalog())
    # gpt-4o-mini: $0.15 input, $0.075 cached, $0.60 output (reasoning = output).
    t = openai_trace(usage, provider="oai", model="gpt-4o-mini")
    pricer.price(t)
    # 800 fresh × 0.15 + 1200 cached × 0.075 + 500 out × 0.60 + 1000 reasoning × 0.60
    assert t["cost_usd"] == pytest.approx((120 + 90 + 300 + 600) / 1e6, rel=1e-12)
    # o4-mini (o-series): $1.10 input, $0.275 cached, $4.40 output.
    t = openai_trace(usage, provider="oai", model="o4-mini")
    pricer.price(t)
    assert t["cost_usd"] == pytest.approx((800 * 1.10 + 1200 * 0.275 + 1500 * 4.40) / 1e6)
    # The naive price (everything at the input/output rates) would be wrong.
    assert t["cost_usd"] != pytest.approx((2000 * 1.10 + 1500 * 4.40) / 1e6)

    # A separate reasoning price splits completion tokens (override in keel.yaml).
    c = catalog(
        {
            "provider": "openai",
            "model": "gpt-4o-mini",
            "input_per_mtok": 0.15,
            "cached_input_per_mtok": 0.075,
            "output_per_mtok": 0.60,
            "reasoning_per_mtok": 2.0,
        }
    )
    t = openai_trace(usage, provider="oai", model="gpt-4o-mini")
    Pricer(c).price(t)
    assert t["cost_usd"] == pytest.approx((120 + 90 + 300 + 2000) / 1e6)


ANTHROPIC_PRICE = {
    "provider": "anthropic",
    "model": "fake-claude",
    "input_per_mtok": 3.0,
    "output_per_mtok": 15.0,
    "cached_input_per_mtok": 0.30,
    "cache_write_per_mtok": 3.75,
}


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_call_through_the_gateway(keel_factory, stream):
    keel = keel_factory(prices=[ANTHROPIC_PRICE])
    body: dict[str, Any] = {
        "model": "claude",
        "messages": [
            {"role": "user", "content": "[[fake: cache_read=1000,cache_write=200]] hello world"}
        ],
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    r = httpx.post(keel.url + "/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 200, r.text
    (row,) = keel.rows()
    # The fake reports input_tokens = 4 words + 3, output_tokens = 3 ("Echo: hello world");
    # the adapter adds cache reads and writes to prompt_tokens.
    assert (row["cached_tokens"], row["cache_write_tokens"]) == (1000, 200)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (7 + 1000 + 200, 3)
    expected = (7 * 3.0 + 1000 * 0.30 + 200 * 3.75 + 3 * 15.0) / 1e6  # $0.001116
    assert expected == pytest.approx(0.001116)
    if row["cost_usd"] is not None:  # once the gateway prices calls itself
        assert row["cost_usd"] == pytest.approx(expected)
    t = dict(row)
    Pricer(PriceCatalog.for_settings(keel.settings)).price(t)
    assert t["cost_usd"] == pytest.approx(expected, rel=1e-12)


def test_tiers_scale_cache_prices_and_apply_above_the_threshold():
    c = catalog(
        {
            **ANTHROPIC_PRICE,
            "tiers": [
                {"above_tokens": 200_000, "input_per_mtok": 6.0, "output_per_mtok": 22.5},
                {"above_tokens": 100_000, "input_per_mtok": 4.0, "output_per_mtok": 18.0},
            ],
        },
        include_catalog=False,
    )

    def cost(pt: int) -> float | None:
        return c.cost(
            "claude",
            "fake-claude",
            prompt_tokens=pt,
            completion_tokens=1000,
            cached_tokens=100_000,
            cache_write_tokens=0,
            started_at_ms=NOW,
        )

    # At the threshold: base prices.
    assert cost(100_000) == pytest.approx((100_000 * 0.30 + 1000 * 15) / 1e6)
    assert cost(200_000) == pytest.approx((100_000 * 4 + 100_000 * 0.40 + 1000 * 18) / 1e6)
    # Above 200K the highest tier wins; cache reads double with the input price.
    assert cost(250_000) == pytest.approx((150_000 * 6 + 100_000 * 0.60 + 1000 * 22.5) / 1e6)
    # The shipped catalog has Sonnet 4.5's long-context tier.
    sonnet = catalog().lookup("claude", "claude-sonnet-4-5-20250929", NOW)
    assert sonnet is not None and sonnet.tiers[0][0] == 200_000


def test_per_request_gpu_hours_and_batch_discount():
    c = catalog(
        {
            "provider": "vllm",
            "model": "llama-70b",
            "input_per_mtok": 0.10,
            "output_per_mtok": 0.20,
            "per_request": 0.001,
            "gpu_hour_usd": 2.0,
            "batch_discount": 0.5,
        },
        include_catalog=False,
    )
    kw = {"prompt_tokens": 1000, "completion_tokens": 500, "started_at_ms": NOW}
    tokens = (1000 * 0.10 + 500 * 0.20) / 1e6
    gpu = 1800 / 3_600_000 * 2.0  # 1.8 s of a $2/h GPU
    assert c.cost("vllm", "llama-70b", duration_ms=1800, **kw) == pytest.approx(
        tokens + 0.001 + gpu
    )
    # Batch calls: the discount applies to token charges only.
    assert c.cost("vllm", "llama-70b", duration_ms=1800, batch=True, **kw) == pytest.approx(
        tokens / 2 + 0.001 + gpu
    )
    t = {
        "status": "ok",
        "provider": "vllm",
        "upstream_model": "llama-70b",
        "prompt_tokens": 1000,
        "completion_tokens": 500,
        "started_at_ms": NOW,
        "duration_ms": 0.0,
        "batch": True,
    }
    Pricer(c).price(t)
    assert t["cost_usd"] == pytest.approx(tokens / 2 + 0.001)


def test_effective_from_keeps_old_prices_for_old_traces():
    old = {"provider": "oai", "model": "m", "input_per_mtok": 1.0, "output_per_mtok": 2.0}
    c = catalog(
        {**old, "effective_from": "2025-01-01"},
        {**old, "effective_from": "2025-06-01", "input_per_mtok": 0.5, "output_per_mtok": 1.0},
        include_catalog=False,
    )

    def cost(at: str) -> float | None:
        return c.cost(
            "oai", "m", prompt_tokens=1_000_000, completion_tokens=0, started_at_ms=ms(at)
        )

    assert cost("2025-03-01T00:00:00") == pytest.approx(1.0)
    assert cost("2025-05-31T23:59:59") == pytest.approx(1.0)
    assert cost("2025-06-01T00:00:00") == pytest.approx(0.5)
    assert cost("2026-01-01T00:00:00") == pytest.approx(0.5)
    assert cost("2024-12-31T23:59:59") is None  # before any price: unknown, not 0
    # The catalog's own history: o3 was cut by 80 % on 2025-06-10.
    cat = catalog()
    kw = {"prompt_tokens": 1_000_000, "completion_tokens": 0}
    assert cat.cost("oai", "o3", started_at_ms=ms("2025-05-01T00:00:00"), **kw) == 10.0
    assert cat.cost("oai", "o3", started_at_ms=ms("2025-07-01T00:00:00"), **kw) == 2.0


def test_keel_yaml_overrides_and_provider_names_beat_kinds():
    cat = catalog()
    kw = {"prompt_tokens": 1_000_000, "completion_tokens": 0, "started_at_ms": NOW}
    assert cat.cost("oai", "gpt-4o", **kw) == pytest.approx(2.50)
    over = catalog(
        {"provider": "openai", "model": "gpt-4o", "input_per_mtok": 2.0},
        {"provider": "azure", "model": "gpt-4o", "input_per_mtok": 2.75},
    )
    assert over.cost("oai", "gpt-4o", **kw) == pytest.approx(2.0)  # keel.yaml beats catalog
    assert over.cost("azure", "gpt-4o", **kw) == pytest.approx(2.75)  # the name beats the kind
    assert over.cost("azure", "gpt-4o-mini", **kw) == pytest.approx(0.15)  # kind fallback
    # An override replaces the catalog's whole history for that model.
    assert over.cost("oai", "gpt-4o", **{**kw, "started_at_ms": ms("2024-06-01")}) == 2.0
    with pytest.raises(ConfigError, match="effective_from"):
        catalog({"provider": "oai", "model": "x", "effective_from": "June 1st"})
    with pytest.raises(ConfigError, match="same effective_from"):
        catalog({"provider": "oai", "model": "x"}, {"provider": "oai", "model": "x"})


def test_dated_model_names_and_aliases():
    cat = catalog()
    # 100K prompt tokens (under Sonnet's 200K tier) × 10: the input price per million.
    kw = {"prompt_tokens": 100_000, "completion_tokens": 0, "started_at_ms": NOW}
    assert cat.cost("oai", "gpt-4o-2024-08-06", **kw) == pytest.approx(2.50 / 10)
    assert cat.cost("oai", "gpt-4o-2024-05-13", **kw) == pytest.approx(5.00 / 10)  # its own entry
    assert cat.cost("oai", "gpt-4o-mini-2024-07-18", **kw) == pytest.approx(0.15 / 10)
    assert cat.cost("claude", "claude-sonnet-4-20250514", **kw) == pytest.approx(3.0 / 10)
    assert cat.cost("claude", "claude-sonnet-4-0", **kw) == pytest.approx(3.0 / 10)
    assert cat.cost("claude", "claude-3-5-haiku-latest", **kw) == pytest.approx(0.80 / 10)
    assert cat.cost("claude", "claude-haiku-4-5-20251001", **kw) == pytest.approx(1.00 / 10)
    assert cat.cost("oai", "gpt-4o-2099-01-01-preview", **kw) is None
    # A kind's prices do not leak to another kind.
    assert cat.cost("claude", "gpt-4o", **kw) is None
    assert cat.cost(None, "gpt-4o", **kw) is None


def test_unknown_price_is_none_with_a_metric_never_zero():
    reg = CollectorRegistry()
    pricer = Pricer(catalog(), reg)

    def unknown(model: str, provider: str) -> float:
        v = reg.get_sample_value("keel_cost_unknown_total", {"model": model, "provider": provider})
        return v or 0.0

    ok = {"status": "ok", "provider": "oai", "model": "alias", "started_at_ms": NOW}
    t = {**ok, "upstream_model": "my-finetune", "prompt_tokens": 10, "completion_tokens": 5}
    pricer.price(t)
    assert t["cost_usd"] is None
    assert unknown("my-finetune", "oai") == 1
    # A failed call without usage: no metric; 0 when the model has a price.
    failed = {**ok, "status": "error", "prompt_tokens": None, "completion_tokens": None}
    t = {**failed, "upstream_model": "my-finetune"}
    pricer.price(t)
    assert t["cost_usd"] is None and unknown("my-finetune", "oai") == 1
    t = {**failed, "upstream_model": "gpt-4o"}
    pricer.price(t)
    assert t["cost_usd"] == 0.0
    # Answered from Keel's response cache: no upstream charge.
    t = {**ok, "upstream_model": "gpt-4o", "prompt_tokens": 10, "cache_hit": True}
    pricer.price(t)
    assert t["cost_usd"] == 0.0
    # The enricher prices a batch and leaves costs already set alone.
    batch = [
        {**ok, "upstream_model": "gpt-4o", "prompt_tokens": 1_000_000, "completion_tokens": 0},
        {**ok, "upstream_model": "gpt-4o", "prompt_tokens": 5, "cost_usd": 42.0},
    ]
    pricer.enrich(batch)
    assert [b["cost_usd"] for b in batch] == [pytest.approx(2.5), 42.0]


def test_catalog_file_is_sane():
    entries, aliases = load_catalog()
    keys = {(e.provider, e.model) for e in entries}
    for model in (
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-4.1",
        "gpt-4.1-mini",
        "gpt-4.1-nano",
        "o1",
        "o3",
        "o3-mini",
        "o4-mini",
        "gpt-5",
        "gpt-5-mini",
        "gpt-5-nano",
        "text-embedding-3-small",
        "text-embedding-3-large",
    ):
        assert ("openai", model) in keys, model
    for model in ("claude-opus-4", "claude-sonnet-4", "claude-sonnet-4-5", "claude-3-5-haiku"):
        assert ("anthropic", model) in keys, model
    assert ("anthropic", "claude-haiku-4-5") in keys
    for e in entries:
        if e.provider == "local":
            assert e.input_per_mtok == e.output_per_mtok == 0
            continue
        assert e.effective_from, e.model
        assert e.input_per_mtok > 0, e.model
        if e.cached_input_per_mtok is not None:
            assert e.cached_input_per_mtok < e.input_per_mtok, e.model
        if e.provider == "anthropic":
            assert e.cache_write_per_mtok and e.cache_write_per_mtok > e.input_per_mtok
    assert aliases["claude-sonnet-4-0"] == "claude-sonnet-4"
    # The embedded models are explicitly free: known, and 0.
    free = catalog().cost(
        "local", "local", prompt_tokens=100, completion_tokens=100, started_at_ms=NOW
    )
    assert free == 0.0


def test_linear_fit():
    xs = [1.0, 2.0, 3.0, 4.0]
    fit = linear_fit(xs, [3 + 2 * x for x in xs])
    assert fit is not None
    assert fit["intercept"] == pytest.approx(3) and fit["slope"] == pytest.approx(2)
    assert fit["r2"] == pytest.approx(1.0)
    assert linear_fit([1.0, 2.0], [1.0, 2.0]) is None
    assert linear_fit([5.0, 5.0, 5.0], [1.0, 2.0, 3.0]) is None


# -- reports on a real Keel ------------------------------------------------------

REPORT_PRICES = [
    {"provider": "fake", "model": "fake", "input_per_mtok": 1.0, "output_per_mtok": 2.0},
    {"provider": "claude", "model": "fake-claude", "input_per_mtok": 3.0, "output_per_mtok": 15.0},
    # cost = $0.001 + $2/M prompt tokens: an exact line for the fit
    {"provider": "fake", "model": "lin", "input_per_mtok": 2.0, "per_request": 0.001},
    {"provider": "fake", "model": "two", "input_per_mtok": 1.0},
]


def _trace(model: str, provider: str, upstream: str, at: int, **kw: Any) -> dict[str, Any]:
    t: dict[str, Any] = {
        "id": new_id(),
        "started_at_ms": at,
        "duration_ms": 100.0,
        "endpoint": "chat",
        "model": model,
        "provider": provider,
        "upstream_model": upstream,
        "status": "ok",
        "http_status": 200,
        "stream": False,
        "tokens_estimated": False,
    }
    t.update(kw)
    if t.get("prompt_tokens") is not None:
        t["total_tokens"] = t["prompt_tokens"] + (t.get("completion_tokens") or 0)
    return t


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def report_keel(request, fake, tmp_path):
    """A real Keel with the costs API, fed traces at chosen times, priced by a Pricer,
    on SQLite and on PostgreSQL."""
    over: dict[str, Any] = {"prices": REPORT_PRICES}
    if request.param == "postgres":
        over["database_url"] = request.getfixturevalue("pg_url")
    server = KeelServer(make_settings(fake, tmp_path / "data", **over))
    pricer = Pricer(PriceCatalog.for_settings(server.settings), CollectorRegistry())
    server.state.recorder.enrichers.insert(0, pricer.enrich)
    server.start()
    rec = server.state.recorder
    now = int(time.time() * 1000)
    gpt = {"prompt_tokens": 1000, "completion_tokens": 500}  # $0.002
    a = {"api_key_id": "k1", "user_id": "u1", "feature": "f1"}
    for _ in range(3):
        rec.record(_trace("gpt", "fake", "fake", now - 2 * 3_600_000, **gpt, **a))
    rec.record(  # $0.0045
        _trace(
            "claude",
            "claude",
            "fake-claude",
            now - 3 * DAY,
            prompt_tokens=1000,
            completion_tokens=100,
            api_key_id="k2",
        )
    )
    rec.record(  # $0.002, outside the projection's 7 days
        _trace("gpt", "fake", "fake", now - 10 * DAY, prompt_tokens=2000, completion_tokens=0)
    )
    rec.record(  # no price: unknown
        _trace(
            "mystery",
            "fake",
            "mystery",
            now - 3_600_000,
            prompt_tokens=10,
            completion_tokens=10,
            api_key_id="k1",
        )
    )
    rec.record(  # failed, no usage: $0
        _trace(
            "gpt",
            "fake",
            "fake",
            now - 3_600_000,
            status="error",
            http_status=502,
            duration_ms=50.0,
        )
    )
    for x in (100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 51200):
        for _ in range(2):
            rec.record(
                _trace(
                    "lin",
                    "fake",
                    "lin",
                    now - 600_000,
                    prompt_tokens=x,
                    completion_tokens=7,
                    duration_ms=100 + 0.05 * x,
                )
            )
    for x in (100, 300):
        rec.record(_trace("two", "fake", "two", now - 600_000, prompt_tokens=x))
    server.flush()
    server.trace_times = {"recent": now - 2 * 3_600_000, "d3": now - 3 * DAY, "d10": now - 10 * DAY}
    yield server
    server.stop()


SQLITE_ONLY = pytest.mark.parametrize("report_keel", ["sqlite"], indirect=True)


def _get(server: KeelServer, path: str, **params: Any) -> Any:
    r = httpx.get(server.url + path, params=params, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


LIN_COST = sum(2 * (0.001 + 2e-6 * x) for x in (100, 200, 400, 800, 1600, 3200, 6400, 12800))
LIN_COST += 2 * (0.001 + 2e-6 * 25600) + 2 * (0.001 + 2e-6 * 51200)
TWO_COST = (100 + 300) / 1e6


def test_costs_grouped_every_way_with_projection(report_keel):
    k = report_keel
    r = _get(k, "/api/costs", group_by="model")
    by = {d["group"]: d for d in r["data"]}
    assert by["gpt"]["requests"] == 5 and by["gpt"]["errors"] == 1
    assert by["gpt"]["cost_usd"] == pytest.approx(3 * 0.002 + 0.002)
    assert by["gpt"]["cost_per_1k_requests"] == pytest.approx(0.008 / 5 * 1000)
    assert by["claude"]["cost_usd"] == pytest.approx(0.0045)
    assert by["mystery"]["cost_usd"] == 0 and by["mystery"]["unknown_cost_requests"] == 1
    assert by["lin"]["cost_usd"] == pytest.approx(LIN_COST)
    total = 0.008 + 0.0045 + LIN_COST + TWO_COST
    assert r["total"]["cost_usd"] == pytest.approx(total)
    assert r["total"]["requests"] == 7 + 20 + 2
    assert r["total"]["unknown_cost_requests"] == 1 and r["unknown_cost_complete"] is True
    assert sum(d["share"] for d in r["data"]) == pytest.approx(1.0)
    assert by["claude"]["share"] == pytest.approx(0.0045 / total)
    assert r["data"][0]["group"] == "lin"  # most expensive first

    # Projection: the last 7 days (not the $0.002 from 10 days ago) × 30/7.
    p = r["projection"]
    base = total - 0.002
    assert p["base_cost_usd"] == pytest.approx(base)
    assert p["projected_monthly_usd"] == pytest.approx(base * 30 / 7)
    assert p["base_days"] == 7 and "30/7" in p["method"]
    assert by["gpt"]["projected_monthly_usd"] == pytest.approx(0.006 * 30 / 7)

    r = _get(k, "/api/costs", group_by="provider")
    by = {d["group"]: d for d in r["data"]}
    assert by["claude"]["requests"] == 1
    assert by["fake"]["cost_usd"] == pytest.approx(total - 0.0045)

    # Per key, through the new rollup dimension; calls without a key under "(none)".
    r = _get(k, "/api/costs", group_by="key")
    by = {d["group"]: d for d in r["data"]}
    assert by["k1"]["requests"] == 4 and by["k1"]["cost_usd"] == pytest.approx(0.006)
    assert by["k1"]["unknown_cost_requests"] == 1
    assert by["k2"]["cost_usd"] == pytest.approx(0.0045)
    assert by["(none)"]["requests"] == 2 + 20 + 2
    assert by["(none)"]["cost_usd"] == pytest.approx(0.002 + LIN_COST + TWO_COST)
    assert by["k1"]["projected_monthly_usd"] == pytest.approx(0.006 * 30 / 7)

    r = _get(k, "/api/costs", group_by="user")
    assert {d["group"]: d["requests"] for d in r["data"]}["u1"] == 3
    r = _get(k, "/api/costs", group_by="feature")
    by = {d["group"]: d for d in r["data"]}
    assert by["f1"]["cost_usd"] == pytest.approx(0.006)

    r = _get(k, "/api/costs", group_by="day")
    days = {d["group"]: d["cost_usd"] for d in r["data"]}
    day = lambda t: datetime.fromtimestamp(t / 1000, UTC).strftime("%Y-%m-%d")  # noqa: E731
    assert days[day(k.trace_times["d10"])] == pytest.approx(0.002)
    assert days[day(k.trace_times["d3"])] == pytest.approx(0.0045)
    assert sum(days.values()) == pytest.approx(total)
    assert [d["group"] for d in r["data"]] == sorted(days)

    # A window: the last 5 days leave out the call of 10 days ago; ISO and epoch ms work.
    r = _get(k, "/api/costs", **{"from": "5d"})
    assert r["total"]["cost_usd"] == pytest.approx(total - 0.002)
    start = datetime.fromtimestamp((k.trace_times["d10"] - DAY) / 1000, UTC)
    r = _get(
        k,
        "/api/costs",
        **{
            "from": start.isoformat().replace("+00:00", "Z"),
            "to": str(k.trace_times["d3"] - 120_000),
        },
    )
    assert r["total"]["cost_usd"] == pytest.approx(0.002)


def test_cost_by_input_length_recovers_a_linear_relation(report_keel):
    r = _get(report_keel, "/api/costs/by-input-length", model="lin", since="1d", buckets=5)
    assert r["points"] == 20 and r["truncated"] is False
    f = r["cost_fit"]
    assert f["intercept_usd"] == pytest.approx(0.001, rel=1e-6)
    assert f["usd_per_prompt_token"] == pytest.approx(2e-6, rel=1e-6)
    assert f["usd_per_1k_prompt_tokens"] == pytest.approx(0.002, rel=1e-6)
    assert f["r2"] == pytest.approx(1.0) and f["n"] == 20
    lf = r["latency_fit"]
    assert lf["intercept_ms"] == pytest.approx(100, rel=1e-6)
    assert lf["ms_per_1k_prompt_tokens"] == pytest.approx(50, rel=1e-6)
    b = r["buckets"]
    assert 2 <= len(b) <= 5 and sum(x["count"] for x in b) == 20
    assert [x["min_prompt_tokens"] for x in b] == sorted(x["min_prompt_tokens"] for x in b)
    assert b[0]["min_prompt_tokens"] == 100 and b[-1]["max_prompt_tokens"] == 51200
    for x in b:
        assert x["mean_cost_usd"] == pytest.approx(0.001 + 2e-6 * x["mean_prompt_tokens"])
    assert sum(x["share_of_cost"] for x in b) == pytest.approx(1.0)

    q = _get(report_keel, "/api/costs/by-input-length", model="lin", scale="quantile", buckets=4)
    assert [x["count"] for x in q["buckets"]] == [6, 4, 6, 4]  # equal lengths stay together

    two = _get(report_keel, "/api/costs/by-input-length", model="two")
    assert two["points"] == 2 and two["cost_fit"] is None
    assert "not enough data" in two["note"]
    none = _get(report_keel, "/api/costs/by-input-length", model="nobody")
    assert none["points"] == 0 and "not enough data" in none["note"]


def test_compare_models_side_by_side(report_keel):
    r = _get(report_keel, "/api/costs/compare", models="gpt,claude,nobody", since="30d")
    by = {d["model"]: d for d in r["data"]}
    assert [d["model"] for d in r["data"]] == ["gpt", "claude", "nobody"]
    g = by["gpt"]
    assert g["requests"] == 5 and g["error_rate"] == pytest.approx(0.2)
    assert 60 < g["latency_p95_ms"] < 160  # from the rollup histogram (all calls ≤ 100 ms)
    assert g["mean_prompt_tokens"] == pytest.approx((3 * 1000 + 2000) / 5)
    assert g["mean_completion_tokens"] == pytest.approx(3 * 500 / 5)
    assert g["cost_per_request"] == pytest.approx(0.008 / 5)
    assert g["cost_per_1k_requests"] == pytest.approx(1.6)
    assert by["claude"]["cost_per_request"] == pytest.approx(0.0045)
    assert by["nobody"]["requests"] == 0 and by["nobody"]["cost_per_request"] is None
    assert "evaluations" in r["note"]
    r = _get(report_keel, "/api/costs/compare", models="gpt", since="5d")
    assert r["data"][0]["requests"] == 4


@SQLITE_ONLY
def test_bad_parameters_are_400(report_keel):
    for path, params, needle in [
        ("/api/costs", {"group_by": "team"}, "group_by"),
        ("/api/costs", {"from": "yesterday"}, "from"),
        ("/api/costs", {"from": "1d", "to": "2d"}, "before"),
        ("/api/costs/compare", {}, "models"),
        ("/api/costs/compare", {"models": " , "}, "models"),
        ("/api/costs/compare", {"models": "a", "since": "soon"}, "since"),
        ("/api/costs/by-input-length", {"buckets": 0}, "buckets"),
        ("/api/costs/by-input-length", {"buckets": "many"}, "buckets"),
        ("/api/costs/by-input-length", {"scale": "linear"}, "scale"),
    ]:
        r = httpx.get(report_keel.url + path, params=params, timeout=10)
        assert r.status_code == 400, (path, params, r.text)
        assert needle in r.json()["error"]["message"], (path, params, r.text)


@SQLITE_ONLY
def test_openapi_lists_the_cost_reports(report_keel):
    spec = _get(report_keel, "/openapi.json")
    for p in ("/api/costs", "/api/costs/by-input-length", "/api/costs/compare"):
        assert p in spec["paths"]
    assert "CostReport" in spec["components"]["schemas"]


@SQLITE_ONLY
def test_cli_costs(report_keel):
    run = CliRunner().invoke
    url = ["--url", report_keel.url]
    r = run(costs, [*url, "--group-by", "model"])
    assert r.exit_code == 0, r.output
    assert "lin" in r.output and "mystery" in r.output and "TOTAL" in r.output
    assert "projected monthly spend" in r.output and "30/7" in r.output
    assert "no known price" in r.output
    r = run(costs, [*url, "--group-by", "key", "--json"])
    assert r.exit_code == 0, r.output
    assert {d["group"] for d in orjson.loads(r.output)["data"]} >= {"k1", "k2", "(none)"}
    r = run(costs, ["compare", *url, "--models", "gpt,claude", "--since", "30d"])
    assert r.exit_code == 0, r.output
    assert "gpt" in r.output and "claude" in r.output and "P95ms" in r.output
    assert "$0.0016 " in r.output and "evaluations" in r.output
    r = run(costs, ["by-length", *url, "--model", "lin", "--buckets", "4"])
    assert r.exit_code == 0, r.output
    assert "fit: cost ≈ $0.001 + $0.002 per 1k prompt tokens (r² 1.000" in r.output
    r = run(costs, [*url, "--group-by", "model", "--since", "whenever"])
    assert r.exit_code == 1 and "'from' must be ISO 8601" in r.output
