"""Prometheus metrics under vLLM's names, so dashboards and autoscaling rules carry over.

Each server owns its own CollectorRegistry (tests start several in one process), with
prometheus_client's process_* and python_* collectors on it. Gauges and counters follow the engine
core's `stats()` after every step (counters advance by the delta of the core's running totals); the
latency histograms are fed from the front end's own timestamps. prometheus_client exposes a Counter
named `x` as `x_total`, exactly as vLLM's do. Every series whose label values are known at start
(all but the connector's per-op errors) has its sample at 0 from the first scrape, so rate() works.

With an offloading connector, vLLM's external prefix-cache counters follow it, as vLLM defines them
(vllm/v1/core/sched/scheduler.py): queries are the tokens of each admitted request beyond its GPU
prefix-cache hit (every admission, as vLLM asks its connector about every request), hits the tokens
the connector then loads from the store instead of computing them (found there, less those the cost
model chose to recompute: tierkv_offload_hit_tokens - tierkv_offload_skipped_load_tokens).
"""

from __future__ import annotations

from prometheus_client import (GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Counter,
                               Gauge, Histogram, disable_created_metrics, generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from engine.connector.metrics import ConnectorMetrics
from engine.core.scheduler import SchedulerStats

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), so histogram queries carry over too.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)

# SchedulerStats running totals -> the counter each one feeds.
_COUNTED = ("prefix_cache_queries", "prefix_cache_hits", "prompt_tokens", "generation_tokens", "num_preemptions")
# Running totals taken from the connector (and the scheduler's), while one is attached.
_EXTERNAL = ("external_prefix_cache_queries", "external_prefix_cache_hits")
# Every reason a request finishes with (`observe_finished`): their samples exist from the start.
FINISH_REASONS = ("stop", "length", "abort")


def _counter_total(metric: Counter) -> float:
    """A labelled counter's value summed over all its children (every tier, say)."""
    return sum(s.value for family in metric.collect() for s in family.samples if s.name.endswith("_total"))


class ServerMetrics:
    """The engine's metrics for one served model, in a registry of their own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str) -> None:
        # vLLM exposes no `_created` series; this switch is process-wide in prometheus_client.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        # process_* and python_* as on vLLM's /metrics (prometheus_client's default collectors).
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self._extra_registries: list[CollectorRegistry] = []
        self._connector: ConnectorMetrics | None = None
        labels = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        self.num_requests_running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.num_requests_waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_cache_usage_perc = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self._counters = {
            "prefix_cache_queries": counter("vllm:prefix_cache_queries",
                                            "Prefix cache queries, in terms of number of queried tokens."),
            "prefix_cache_hits": counter("vllm:prefix_cache_hits",
                                         "Prefix cache hits, in terms of number of cached tokens."),
            "prompt_tokens": counter("vllm:prompt_tokens", "Number of prefill tokens processed."),
            "generation_tokens": counter("vllm:generation_tokens", "Number of generation tokens processed."),
            "num_preemptions": counter("vllm:num_preemptions", "Cumulative number of preemptions from the engine."),
            "external_prefix_cache_queries": counter(
                "vllm:external_prefix_cache_queries",
                "External prefix cache queries from KV connector cross-instance cache sharing, in terms of "
                "number of queried tokens."),
            "external_prefix_cache_hits": counter(
                "vllm:external_prefix_cache_hits",
                "External prefix cache hits from KV connector cross-instance cache sharing, in terms of "
                "number of cached tokens."),
        }
        self.prompt_tokens_cached = counter("vllm:prompt_tokens_cached",
                                            "Number of cached prompt tokens (local + external).")
        self._last_totals = dict.fromkeys(_COUNTED + _EXTERNAL, 0)
        self.time_to_first_token = histogram("vllm:time_to_first_token_seconds",
                                             "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.inter_token_latency = histogram("vllm:inter_token_latency_seconds",
                                             "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self.e2e_request_latency = histogram("vllm:e2e_request_latency_seconds",
                                             "Histogram of e2e request latency in seconds.", E2E_BUCKETS)
        self._request_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                        ["model_name", "finished_reason"], registry=self.registry)
        for reason in FINISH_REASONS:
            self._request_success.labels(model_name, reason)
        self._model_name = model_name

    def observe_stats(self, stats: SchedulerStats) -> None:
        """Follow the core's gauges and advance the counters by what the core counted since last time."""
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage_perc.set(stats.kv_cache_usage)
        totals = {name: getattr(stats, name) for name in _COUNTED}
        if self._connector is not None:
            # Hits before skipped: the engine thread counts a request's hits first, so this never
            # reads more hits than it has counted (a total read short is made up at the next step).
            hits = _counter_total(self._connector.hit_tokens)
            totals["external_prefix_cache_hits"] = hits - _counter_total(self._connector.skipped_load_tokens)
            totals["external_prefix_cache_queries"] = stats.prefix_cache_queries - stats.prefix_cache_hits
        for name, total in totals.items():
            delta = total - self._last_totals[name]
            if delta > 0:
                self._counters[name].inc(delta)
                self._last_totals[name] = total

    def observe_first_token(self, num_cached_tokens: int) -> None:
        """A request's prefill is done: count its prompt tokens that were not computed (vLLM's
        prompt_tokens_cached: the GPU prefix-cache hit plus what was loaded from the store)."""
        if num_cached_tokens > 0:
            self.prompt_tokens_cached.inc(num_cached_tokens)

    def totals(self) -> dict[str, float]:
        """The running totals behind the counters (as of the last step), for the periodic stats line."""
        return dict(self._last_totals)

    @property
    def has_connector(self) -> bool:
        return self._connector is not None

    def attach_connector(self, connector_metrics: ConnectorMetrics, tiers: list[str]) -> None:
        """Export the offloading connector's metrics on this /metrics, feed the external prefix-cache
        counters from them, and create its per-tier series for `tiers` at 0."""
        self._connector = connector_metrics
        self.add_registry(connector_metrics.registry)
        for tier in tiers:
            for metric in (connector_metrics.hit_tokens, connector_metrics.skipped_load_tokens):
                connector_metrics.value(metric, tier=tier)   # reading a child creates it, at 0

    def observe_finished(self, finish_reason: str) -> None:
        """Count one finished request by why it finished (stop, length, abort)."""
        self._request_success.labels(self._model_name, finish_reason).inc()

    def add_registry(self, registry: CollectorRegistry) -> None:
        """Export another component's metrics (the offloading connector's) on the same /metrics."""
        self._extra_registries.append(registry)

    def render(self) -> bytes:
        """The Prometheus text exposition of this server's registry and the ones added to it."""
        return b"".join(generate_latest(r) for r in [self.registry, *self._extra_registries])
