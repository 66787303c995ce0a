"""Offloading metrics on the engine's /metrics (one registry per engine, merged by the server)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ConnectorMetrics:
    """Counters and histograms of one engine's offloading connector."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels + list(extra), registry=self.registry)

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, buckets=_LATENCY_BUCKETS, registry=self.registry)

        self._model = model_name
        self.lookups = counter("tierkv_offload_lookups", "Store lookups made at request admission")
        self.hit_tokens = counter("tierkv_offload_hit_tokens", "Prompt tokens found in the store, by tier", ("tier",))
        self.loaded_tokens = counter("tierkv_offload_loaded_tokens", "Prompt tokens loaded from the store instead of computed")
        self.recomputed_tokens = counter("tierkv_offload_recomputed_tokens",
                                         "Prompt tokens computed by requests allowed to load from the store")
        self.failed_load_tokens = counter("tierkv_offload_failed_load_tokens",
                                          "Tokens the store reported but could not deliver (recomputed instead)")
        self.saved_blocks = counter("tierkv_offload_saved_blocks", "Blocks handed to the store")
        self.bytes_saved = counter("tierkv_offload_saved_bytes", "Bytes handed to the store")
        self.bytes_loaded = counter("tierkv_offload_loaded_bytes", "Bytes loaded from the store")
        self.skipped_load_tokens = counter("tierkv_offload_skipped_load_tokens",
                                           "Prompt tokens found in the store but recomputed, because loading them "
                                           "was estimated slower than computing them, by tier", ("tier",))
        self.unasked_lookups = counter("tierkv_offload_unasked_lookups",
                                       "Lookups that did not ask a tier, because loading from it was estimated "
                                       "slower than computing, by tier", ("tier",))
        self.corrupt_blocks = counter("tierkv_offload_corrupt_blocks",
                                      "Loaded blocks that failed their checksum (recomputed, the copy deleted)")
        self.dropped_saves = counter("tierkv_offload_dropped_saves", "Blocks not saved because the save queue was full")
        self.store_errors = counter("tierkv_offload_store_errors", "Failed store operations, by operation", ("op",))
        self.load_seconds = hist("tierkv_offload_load_seconds", "Time from load start to pages ready")
        self.save_seconds = hist("tierkv_offload_save_seconds",
                                 "Time from a batch's copies starting to its blocks being in the store")
        self.load_phase_seconds = Histogram(
            "tierkv_offload_load_phase_seconds", "Time of each phase of a load: fetch (leasing slots, "
            "promotion from a lower tier), copy (slots to pages), verify (checksums over the pages, until seen)",
            labels + ["phase"], buckets=_LATENCY_BUCKETS, registry=self.registry)

    def inc(self, metric: Counter, amount: float = 1, **labels: str) -> None:
        if amount:
            metric.labels(model_name=self._model, **labels).inc(amount)

    def observe(self, metric: Histogram, value: float) -> None:
        metric.labels(model_name=self._model).observe(value)

    def count_saved(self, stored: int, wanted: int, block_bytes: int) -> None:
        """What came of saving `wanted` blocks: `stored` kept; fewer means every tier meant for the
        rest refused it (down, full)."""
        if stored < wanted:
            self.inc(self.store_errors, op="put")
            logger.warning("the store kept %d of %d block(s)", stored, wanted)
        self.inc(self.saved_blocks, stored)
        self.inc(self.bytes_saved, stored * block_bytes)

    def observe_phase(self, phase: str, value: float) -> None:
        self.load_phase_seconds.labels(model_name=self._model, phase=phase).observe(value)

    def value(self, metric: Counter, **labels: str) -> float:
        """Current value of a counter (for tests and benchmarks)."""
        return metric.labels(model_name=self._model, **labels)._value.get()

    def snapshot(self) -> dict[str, float]:
        """Every counter as {"tierkv_offload_x{label=value}": value}, and each histogram's `_sum` and
        `_count`, without the model label (what tests, benchmarks and the engine-process helper report)."""
        out: dict[str, float] = {}
        for family in self.registry.collect():
            kept = ("_total",) if family.type == "counter" else ("_sum", "_count")
            for sample in family.samples:
                if not sample.name.endswith(kept) or not sample.value:
                    continue
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
                name = sample.name.removesuffix("_total")
                out[f"{name}{{{labels}}}" if labels else name] = sample.value
        return out
