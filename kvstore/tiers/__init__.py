"""Storage tiers (CPU memory, Redis, S3), built by type name from their config."""

from __future__ import annotations

from kvstore.config import MemoryTierConfig, ObjTierConfig, RedisTierConfig, TierConfig
from kvstore.tiers.base import Tier, TierError, TierUsage


def build_tier(cfg: TierConfig) -> Tier:
    """The tier a config object describes (client libraries are imported only when used)."""
    if isinstance(cfg, MemoryTierConfig) and cfg.slot_bytes is not None:
        from kvstore.tiers.slab import SlabTier

        return SlabTier(cfg)
    if isinstance(cfg, MemoryTierConfig):
        from kvstore.tiers.memory import MemoryTier

        return MemoryTier(cfg)
    if isinstance(cfg, RedisTierConfig):
        from kvstore.tiers.redis import RedisTier

        return RedisTier(cfg)
    if isinstance(cfg, ObjTierConfig):
        from kvstore.tiers.obj import ObjTier

        return ObjTier(cfg)
    raise TypeError(f"unknown tier config {type(cfg).__name__}")


__all__ = ["Tier", "TierError", "TierUsage", "build_tier"]
