"""Prices of model calls: the shipped catalog, keel.yaml overrides, the cost of one call.

A price is looked up by the provider of the call and the upstream model name:

1. entries that name the call's *provider* (a name from keel.yaml) win over
   entries for its provider *kind* (``openai``, ``anthropic``, ``local``);
2. for each, the exact model name first, then the name without a trailing
   date or ``-latest`` (``gpt-4o-2024-08-06`` → ``gpt-4o``,
   ``claude-sonnet-4-20250514`` → ``claude-sonnet-4``, ``gpt-4-0613`` →
   ``gpt-4``), each also through the catalog's aliases
   (``claude-sonnet-4-0`` → ``claude-sonnet-4``). A dated snapshot with its own
   price (``gpt-4o-2024-05-13``) has its own entry and keeps it;
3. among the entries found, the one in force when the call started (the latest
   ``effective_from`` not after it). A call before the earliest entry, or with no
   entry at all, has an unknown cost: ``None``, never 0.

A keel.yaml entry for a provider + model replaces every catalog entry for that
same provider + model (give several with ``effective_from`` to keep history).

How tokens are charged (usage as Keel records it, see ``keel.gateway.calls``):

- ``prompt_tokens`` includes cache reads (``cached_tokens``, OpenAI's
  ``prompt_tokens_details.cached_tokens``, Anthropic's
  ``cache_read_input_tokens``) and cache writes (``cache_write_tokens``,
  Anthropic's ``cache_creation_input_tokens``; the Anthropic adapter reports
  ``prompt_tokens = input + cache_read + cache_write``). Each part is charged at
  its own rate; only the rest at the input price.
- ``completion_tokens`` includes ``reasoning_tokens`` (OpenAI's
  ``completion_tokens_details.reasoning_tokens``), charged at
  ``reasoning_per_mtok`` (default: the output price).
- A tier applies when ``prompt_tokens > above_tokens`` (the highest such tier);
  it replaces the input and output prices, and scales the cache prices (and an
  explicit reasoning price) by the same ratio, as Anthropic's long-context
  pricing does.
- ``batch_discount`` takes that share off the token charges of batch calls;
  ``per_request`` and ``gpu_hour_usd × duration`` are added to every call.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from keel.config import PriceSettings, Settings, format_validation_error
from keel.errors import ConfigError

log = logging.getLogger("keel.costs")

CATALOG_PATH = Path(__file__).with_name("prices.yaml")
_DATED = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4}|latest)$")
_ALWAYS = -(1 << 62)
_MEMO_MAX = 4096


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens of each kind."""

    input: float
    cached: float
    write: float
    output: float
    reasoning: float


@dataclass(frozen=True, slots=True)
class Price:
    """One compiled price entry."""

    provider: str
    model: str
    start_ms: int  # effective_from as UTC epoch ms (a very small number: always)
    base: Rates
    tiers: tuple[tuple[int, Rates], ...]  # (above_tokens, rates), highest first
    per_request: float
    gpu_usd_per_ms: float
    batch_factor: float  # 1 - batch_discount
    source: str  # "catalog" or "keel.yaml"
    settings: PriceSettings


def _date_ms(value: str | None, where: str) -> int:
    if value is None:
        return _ALWAYS
    try:
        d = datetime.strptime(value.strip(), "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise ConfigError(
            f"{where}.effective_from: {value!r} is not a date (use YYYY-MM-DD)"
        ) from None
    return int(d.timestamp() * 1000)


def _compile(s: PriceSettings, source: str, where: str) -> Price:
    inp, out = s.input_per_mtok, s.output_per_mtok
    base = Rates(
        input=inp,
        cached=inp if s.cached_input_per_mtok is None else s.cached_input_per_mtok,
        write=inp if s.cache_write_per_mtok is None else s.cache_write_per_mtok,
        output=out,
        reasoning=out if s.reasoning_per_mtok is None else s.reasoning_per_mtok,
    )
    tiers = []
    for t in sorted(s.tiers, key=lambda t: -t.above_tokens):
        ki = t.input_per_mtok / inp if inp else 1.0
        ko = t.output_per_mtok / out if out else 1.0
        tiers.append(
            (
                t.above_tokens,
                Rates(
                    input=t.input_per_mtok,
                    cached=base.cached * ki,
                    write=base.write * ki,
                    output=t.output_per_mtok,
                    reasoning=t.output_per_mtok
                    if s.reasoning_per_mtok is None
                    else s.reasoning_per_mtok * ko,
                ),
            )
        )
    return Price(
        provider=s.provider,
        model=s.model,
        start_ms=_date_ms(s.effective_from, where),
        base=base,
        tiers=tuple(tiers),
        per_request=s.per_request,
        gpu_usd_per_ms=(s.gpu_hour_usd or 0.0) / 3_600_000.0,
        batch_factor=1.0 - s.batch_discount,
        source=source,
        settings=s,
    )


def load_catalog(path: str | Path | None = None) -> tuple[list[PriceSettings], dict[str, str]]:
    """The shipped catalog (or another file in its format): entries and model aliases."""
    p = Path(path) if path is not None else CATALOG_PATH
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"price catalog {p}: {e}") from e
    raw = data.get("prices") if isinstance(data, dict) else None
    if not isinstance(raw, list):
        raise ConfigError(f"price catalog {p}: expected a top-level `prices:` list")
    entries: list[PriceSettings] = []
    aliases: dict[str, str] = {}
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(f"price catalog {p}: prices.{i} must be a mapping")
        item = dict(item)
        for a in item.pop("aliases", None) or []:
            aliases[str(a)] = str(item.get("model"))
        try:
            entries.append(PriceSettings.model_validate(item))
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, f"{p} prices.{i}")) from None
    return entries, aliases


class PriceCatalog:
    """Prices by provider and model; :meth:`cost` prices one call in about a microsecond."""

    def __init__(
        self,
        table: Mapping[tuple[str, str], Iterable[Price]],
        provider_kinds: Mapping[str, str],
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self._table = {k: tuple(sorted(v, key=lambda p: p.start_ms)) for k, v in table.items()}
        self._kinds = dict(provider_kinds)
        self._aliases = dict(aliases or {})
        self._memo: dict[tuple[str | None, str | None], tuple[Price, ...]] = {}

    @classmethod
    def from_settings(
        cls,
        prices: Iterable[PriceSettings],
        provider_kinds: Mapping[str, str],
        *,
        catalog_path: str | Path | None = None,
        include_catalog: bool = True,
    ) -> PriceCatalog:
        """The shipped catalog with keel.yaml's ``prices:`` on top.

        ``provider_kinds`` maps each configured provider name to its kind, so an
        entry may name either. Raises :class:`ConfigError` for a bad date or two
        entries for the same provider, model and date.
        """
        table: dict[tuple[str, str], list[Price]] = {}
        aliases: dict[str, str] = {}
        if include_catalog:
            base, aliases = load_catalog(catalog_path)
            for i, s in enumerate(base):
                table.setdefault((s.provider, s.model), []).append(
                    _compile(s, "catalog", f"price catalog prices.{i}")
                )
        user: dict[tuple[str, str], list[Price]] = {}
        for i, s in enumerate(prices):
            user.setdefault((s.provider, s.model), []).append(
                _compile(s, "keel.yaml", f"prices.{i} ({s.provider}/{s.model})")
            )
        table.update(user)
        for (prov, model), entries in table.items():
            starts = [p.start_ms for p in entries]
            if len(set(starts)) != len(starts):
                src = entries[0].source
                raise ConfigError(
                    f"{'prices' if src == 'keel.yaml' else 'price catalog'}: two entries for "
                    f"{prov}/{model} with the same effective_from; give each a different date"
                )
        return cls(table, provider_kinds, aliases)

    @classmethod
    def for_settings(cls, settings: Settings) -> PriceCatalog:
        """:meth:`from_settings` with the provider kinds of ``settings`` (and ``local``)."""
        kinds = {name: p.kind for name, p in settings.providers.items()}
        if settings.local.enabled:
            kinds["local"] = "local"
        return cls.from_settings(settings.prices, kinds)

    # -- lookup -------------------------------------------------------------

    def _resolve(self, provider: str | None, model: str | None) -> tuple[Price, ...]:
        found: tuple[Price, ...] = ()
        if provider is not None and model:
            names = [model, self._aliases.get(model)]
            stripped = _DATED.sub("", model)
            if stripped != model:
                names += [stripped, self._aliases.get(stripped)]
            provs = [provider]
            kind = self._kinds.get(provider)
            if kind is not None and kind != provider:
                provs.append(kind)
            for prov in provs:
                for name in names:
                    if name is not None and (prov, name) in self._table:
                        found = self._table[(prov, name)]
                        break
                if found:
                    break
        if len(self._memo) >= _MEMO_MAX:
            self._memo.clear()
        self._memo[(provider, model)] = found
        return found

    def lookup(self, provider: str | None, model: str | None, started_at_ms: int) -> Price | None:
        """The entry that prices a call of ``model`` on ``provider`` at that time, or None."""
        prices = self._memo.get((provider, model))
        if prices is None:
            prices = self._resolve(provider, model)
        for p in reversed(prices):
            if started_at_ms >= p.start_ms:
                return p
        return None

    def cost(
        self,
        provider: str | None,
        model: str | None,
        *,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        cached_tokens: int | None = None,
        cache_write_tokens: int | None = None,
        reasoning_tokens: int | None = None,
        started_at_ms: int,
        duration_ms: float = 0.0,
        batch: bool = False,
    ) -> float | None:
        """USD cost of one call, or None when no price is known (see the module doc)."""
        prices = self._memo.get((provider, model))
        if prices is None:
            prices = self._resolve(provider, model)
        for p in reversed(prices):
            if started_at_ms >= p.start_ms:
                break
        else:
            return None
        pt = prompt_tokens or 0
        r = p.base
        for above, tier in p.tiers:
            if pt > above:
                r = tier
                break
        cached = cached_tokens or 0
        write = cache_write_tokens or 0
        reasoning = reasoning_tokens or 0
        fresh = pt - cached - write
        if fresh < 0:
            fresh = 0
        out = (completion_tokens or 0) - reasoning
        if out < 0:
            out = 0
        usd = (
            fresh * r.input
            + cached * r.cached
            + write * r.write
            + out * r.output
            + reasoning * r.reasoning
        ) / 1e6
        if batch:
            usd *= p.batch_factor
        return usd + p.per_request + duration_ms * p.gpu_usd_per_ms

    def entries(self) -> list[Price]:
        """Every entry, sorted by provider, model and date (for listing prices)."""
        return sorted(
            (p for ps in self._table.values() for p in ps),
            key=lambda p: (p.provider, p.model, p.start_ms),
        )


class Pricer:
    """Sets ``cost_usd`` on traces and counts the calls it cannot price.

    ``keel_cost_unknown_total{model,provider}`` counts calls with no known price
    (``model`` is the upstream model, what a price is keyed by); a failed call
    that reported no usage is not counted and costs 0 when its model has a
    price. A call answered from Keel's response cache costs 0.
    """

    def __init__(self, catalog: PriceCatalog, registry: CollectorRegistry | None = None) -> None:
        self.catalog = catalog
        self.unknown = Counter(
            "keel_cost_unknown",
            "Calls whose cost is unknown (no price for the provider and upstream model; "
            "add one under `prices:` in keel.yaml).",
            ["model", "provider"],
            registry=registry,
        )
        self._warned: set[tuple[str, str]] = set()

    def price(self, trace: dict[str, Any]) -> None:
        """Set ``trace["cost_usd"]`` from its provider, model, usage and start time."""
        if trace.get("cache_hit"):
            trace["cost_usd"] = 0.0
            return
        provider = trace.get("provider")
        model = trace.get("upstream_model") or trace.get("model")
        pt, ct = trace.get("prompt_tokens"), trace.get("completion_tokens")
        started = trace.get("started_at_ms") or 0
        if trace.get("status") != "ok" and not pt and not ct:
            known = self.catalog.lookup(provider, model, started) is not None
            trace["cost_usd"] = 0.0 if known else None
            return
        c = self.catalog.cost(
            provider,
            model,
            prompt_tokens=pt,
            completion_tokens=ct,
            cached_tokens=trace.get("cached_tokens"),
            cache_write_tokens=trace.get("cache_write_tokens"),
            reasoning_tokens=trace.get("reasoning_tokens"),
            started_at_ms=started,
            duration_ms=trace.get("duration_ms") or 0.0,
            batch=bool(trace.get("batch")),
        )
        trace["cost_usd"] = c
        if c is None:
            key = (str(model or ""), str(provider or ""))
            self.unknown.labels(*key).inc()
            if key not in self._warned and len(self._warned) < 1000:
                self._warned.add(key)
                log.warning(
                    "no price for model %r on provider %r: its calls have an unknown cost; "
                    "add it under `prices:` in keel.yaml",
                    key[0],
                    key[1],
                )

    def enrich(self, batch: Iterable[dict[str, Any]]) -> None:
        """Recorder enricher: price every trace of a batch that has no cost yet. Never raises."""
        for t in batch:
            if t.get("cost_usd") is None:
                try:
                    self.price(t)
                except Exception:
                    log.exception("pricing a trace failed; its cost stays unknown")
