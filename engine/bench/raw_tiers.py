"""The bare client of a Redis or S3 tier reading the same bytes a hit loaded, in the same run: the
ceiling the tier's load rate is measured against (`tierkv bench offload`'s "raw GB/s").

The values are the tier's frame size (a block and its header), as many as the hit loaded, written
first and then read back in one call, as the tier reads a hit: pipelined redis-py GETs on the
tier's `batch_connections` connections; concurrent boto3 GETs, `max_inflight` at once.
"""

from __future__ import annotations

import os
import time

from kvstore.bench import RawRedis, RawS3
from kvstore.checksum import HEADER_BYTES
from kvstore.config import ObjTierConfig, RedisTierConfig, parse_tiers


def raw_get_gb_per_s(tier: dict, blocks: int, block_bytes: int) -> float | None:
    """GB/s of the bare client reading `blocks` values of a `block_bytes` block's frame; None for a
    tier with no bare client to compare with (memory)."""
    (cfg,) = parse_tiers([tier])
    if isinstance(cfg, RedisTierConfig):
        raw = RawRedis(cfg)
    elif isinstance(cfg, ObjTierConfig):
        raw = RawS3(cfg)
    else:
        return None
    value = os.urandom(block_bytes + HEADER_BYTES)
    names = raw.names(blocks)
    try:
        raw.put(names, [value] * blocks)
        start = time.perf_counter()
        got = raw.get(names)
        seconds = time.perf_counter() - start
        if any(v != value for v in got):
            raise RuntimeError(f"the bare {type(raw).__name__} client read back other bytes than it wrote")
        raw.delete(names)
    finally:
        raw.close()
    return blocks * len(value) / seconds / 1e9
