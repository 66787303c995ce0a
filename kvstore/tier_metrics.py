"""Prometheus metrics of the store's tiers, labelled by tier name.

Created once per process in prometheus_client's default REGISTRY, so every `TieredStore` in the
process (tests build many) reports into the same series; the daemon exposes that registry.

A tier's counters have their samples at 0 from the moment the tier is built (its guard sets
`kvstore_tier_up`, which creates them), so a fresh daemon shows them and rate() works from the
first scrape. The memory and slab tiers set `kvstore_tier_blocks`/`_bytes` on every put, eviction
and delete; remote tiers (Redis, S3) only learn theirs from a stats call.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HITS = Counter("kvstore_tier_hits", "Blocks found (and verified) in a tier on get", ["tier"])
MISSES = Counter("kvstore_tier_misses", "Blocks asked of a tier and not found there", ["tier"])
BLOCKS_HELD = Gauge("kvstore_tier_blocks", "Blocks held by a tier (remote tiers: as of the last stats call)", ["tier"])
BYTES_HELD = Gauge("kvstore_tier_bytes", "Payload bytes held by a tier (remote tiers: as of the last stats call)", ["tier"])
BYTES_IN = Counter("kvstore_tier_bytes_in", "Payload bytes written into a tier", ["tier"])
BYTES_OUT = Counter("kvstore_tier_bytes_out", "Payload bytes read out of a tier", ["tier"])
EVICTIONS = Counter("kvstore_tier_evictions", "Blocks evicted from a tier to stay within its byte budget", ["tier"])
DEMOTIONS = Counter("kvstore_tier_demotions", "Evicted blocks written down into a tier", ["tier"])
PROMOTIONS = Counter("kvstore_tier_promotions", "Blocks copied up into a tier after a hit lower down", ["tier"])
CORRUPT = Counter("kvstore_tier_corrupt", "Blocks that failed their checksum on read (deleted, served as a miss)", ["tier"])
ERRORS = Counter("kvstore_tier_errors", "Tier operations that failed (the tier was treated as a miss / skipped)", ["tier", "op"])
# The counters labelled by tier alone: created at 0 for each tier `UP` is told about.
_PER_TIER_COUNTERS = (HITS, MISSES, BYTES_IN, BYTES_OUT, EVICTIONS, DEMOTIONS, PROMOTIONS, CORRUPT)


class _TierUpGauge(Gauge):
    """`kvstore_tier_up`, whose `labels(tier)` also creates that tier's counters (at 0)."""

    def labels(self, *labelvalues, **labelkwargs):
        child = super().labels(*labelvalues, **labelkwargs)
        tier = labelvalues[0] if labelvalues else labelkwargs["tier"]
        for counter in _PER_TIER_COUNTERS:
            counter.labels(tier)
        return child


UP = _TierUpGauge("kvstore_tier_up", "1 while a tier answers, 0 while it is in an outage", ["tier"])
OP_SECONDS = Histogram(
    "kvstore_tier_op_seconds",
    "Latency of one batched tier operation",
    ["tier", "op"],
    buckets=(0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
)
