"""Prometheus metrics of the store's tiers, labelled by tier name.

Created once per process in prometheus_client's default REGISTRY, so every `TieredStore` in the
process (tests build many) reports into the same series; the daemon exposes that registry.
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
UP = Gauge("kvstore_tier_up", "1 while a tier answers, 0 while it is in an outage", ["tier"])
OP_SECONDS = Histogram(
    "kvstore_tier_op_seconds",
    "Latency of one batched tier operation",
    ["tier", "op"],
    buckets=(0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
)
