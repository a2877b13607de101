"""Prometheus metrics of one Keel process (prometheus-client), served at ``/metrics``.

Per-call metrics are updated by the recorder's writer thread from each drained
batch (an observer), not on the request path: the gateway only enqueues. They
lag by at most ``recorder.flush_interval_s``, far below any scrape interval.

Labels are bounded: ``model`` is a configured alias (unknown models are
rejected before a trace exists), ``provider`` a configured provider, ``status``
and ``error_type`` small enums. Never a user, key or feature id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from keel.tracing.model import TraceRecord

# Seconds; log-spaced like the rollup buckets, from 5 ms to 5 min.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "keel_requests",
            "Gateway calls, by outcome.",
            ["model", "provider", "endpoint", "status"],
            registry=registry,
        )
        self.errors = Counter(
            "keel_request_errors",
            "Failed gateway calls, by error type.",
            ["model", "provider", "error_type"],
            registry=registry,
        )
        self.duration = Histogram(
            "keel_request_duration_seconds",
            "Gateway call duration (whole call).",
            ["model", "provider", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "keel_time_to_first_token_seconds",
            "Time to the first token of streamed calls.",
            ["model", "provider"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "keel_tokens",
            "Tokens through the gateway.",
            ["model", "provider", "direction"],
            registry=registry,
        )
        self.cost = Counter(
            "keel_cost_usd",
            "Cost of gateway calls in USD (calls with a known price).",
            ["model", "provider"],
            registry=registry,
        )
        self.inflight = Gauge(
            "keel_inflight_requests", "Gateway calls in progress.", ["endpoint"], registry=registry
        )
        self._children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}

    def observe(self, batch: Sequence[TraceRecord]) -> None:
        """Recorder observer: update the per-call metrics from a drained batch.

        Counters are summed per label set first and histogram children are
        cached, so the writer thread spends ~2 µs per trace here (it shares the
        GIL with the event loop).
        """
        counts: dict[tuple[str, str, str, str], int] = {}
        errors: dict[tuple[str, str, str], int] = {}
        tokens: dict[tuple[str, str, str], int] = {}
        cost: dict[tuple[str, str], float] = {}
        cache = self._children
        for t in batch:
            model, provider = t.get("model") or "", t.get("provider") or ""
            endpoint, status = t.get("endpoint") or "", t.get("status") or ""
            k = (model, provider, endpoint, status)
            counts[k] = counts.get(k, 0) + 1
            if status == "error":
                ek = (model, provider, t.get("error_type") or "unknown")
                errors[ek] = errors.get(ek, 0) + 1
            hist = cache.get(k)
            if hist is None:
                hist = cache[k] = (
                    self.duration.labels(model, provider, endpoint),
                    self.ttft.labels(model, provider),
                )
            hist[0].observe((t.get("duration_ms") or 0.0) / 1000)
            ttft = t.get("ttft_ms")
            if ttft is not None:
                hist[1].observe(ttft / 1000)
            pt, ct = t.get("prompt_tokens"), t.get("completion_tokens")
            if pt:
                tk = (model, provider, "prompt")
                tokens[tk] = tokens.get(tk, 0) + pt
            if ct:
                tk = (model, provider, "completion")
                tokens[tk] = tokens.get(tk, 0) + ct
            c = t.get("cost_usd")
            if c:
                cost[(model, provider)] = cost.get((model, provider), 0.0) + c
        for k, n in counts.items():
            self.requests.labels(*k).inc(n)
        for ek, n in errors.items():
            self.errors.labels(*ek).inc(n)
        for tk, n in tokens.items():
            self.tokens.labels(*tk).inc(n)
        for ck, v in cost.items():
            self.cost.labels(*ck).inc(v)


class CallbackCollector(Collector):
    """Metrics read at scrape time from live objects (recorder counters, daemons)."""

    def __init__(self, fn: Callable[[], Iterable[Any]]) -> None:
        self.fn = fn

    def collect(self) -> Iterable[Any]:
        yield from self.fn()


def recorder_families(recorder: Any) -> Callable[[], Iterable[Any]]:
    def collect() -> Iterable[Any]:
        s = recorder.stats
        g = GaugeMetricFamily("keel_recorder_queue_depth", "Traces waiting to be written.")
        g.add_metric([], recorder.queue_depth)
        yield g
        c = CounterMetricFamily(
            "keel_recorder_traces", "Traces by what the recorder did.", labels=["outcome"]
        )
        for outcome in ("enqueued", "written", "spilled", "replayed", "dropped"):
            c.add_metric([outcome], getattr(s, outcome))
        yield c
        e = CounterMetricFamily("keel_recorder_write_errors", "Failed store writes.")
        e.add_metric([], s.write_errors)
        yield e
        up = GaugeMetricFamily("keel_store_up", "1 when the last store write succeeded.")
        up.add_metric([], 1.0 if s.store_up else 0.0)
        yield up

    return collect


def daemon_families(daemons: Callable[[], Iterable[Any]]) -> Callable[[], Iterable[Any]]:
    def collect() -> Iterable[Any]:
        ticks = CounterMetricFamily("keel_daemon_ticks", "Daemon loop runs.", labels=["daemon"])
        fails = CounterMetricFamily(
            "keel_daemon_failures", "Daemon loop runs that failed.", labels=["daemon"]
        )
        lead = GaugeMetricFamily(
            "keel_daemon_leader", "1 when this replica runs the daemon.", labels=["daemon"]
        )
        for d in daemons():
            ticks.add_metric([d.name], d.stats.ticks)
            fails.add_metric([d.name], d.stats.failures)
            lead.add_metric([d.name], 1.0 if (d.stats.leader or not d.singleton) else 0.0)
        yield ticks
        yield fails
        yield lead

    return collect
