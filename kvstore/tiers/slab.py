"""The daemon's memory tier as a slab in shared memory: what same-host engines map and lease.

A memory tier with `slot_bytes` keeps its blocks in the slots of a /dev/shm segment the daemon
creates at start (kvstore/slab_segment.py), indexed by kvstore.slab.Slab (LRU touched tail-first,
leases that eviction never takes). Engines on the host map the segment and move block bytes
between their GPU and the slots by DMA; gRPC carries only slot numbers (kvstore/slab_sessions.py).

This class is also an ordinary `Tier`, for the payload path (Put/Get from remote clients, and the
store's promotion and write-down): a block is copied into a slot on put (it must fit one) and out of
it on get, under a lease, so no slot changes while it is read. An evicted block's bytes are copied
out while the slab still holds its slot (the slot is reused right after) and queued for the store
to write down to the next tier: `put` hands back what is queued, `take_evicted` the rest.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from kvstore import tier_metrics
from kvstore.checksum import SealedBlock
from kvstore.config import ConfigError, MemoryTierConfig
from kvstore.slab import EvictedSlot, Slab
from kvstore.slab_segment import SegmentError, SlabSegment
from kvstore.tiers.base import Evicted, Tier, TierUsage


class SlabTier(Tier):
    """Blocks in the slots of a shared-memory slab of `bytes // slot_bytes` slots."""

    def __init__(self, cfg: MemoryTierConfig) -> None:
        self.name = cfg.tier_name
        self.verify_reads = cfg.verify_reads
        num_slots = cfg.bytes // cfg.slot_bytes
        try:
            self.segment = SlabSegment(num_slots, cfg.slot_bytes)
        except SegmentError as error:
            raise ConfigError(f"tiers.0.memory.bytes: {error.strerror}; lower bytes or give /dev/shm more room "
                              f"(containers: --shm-size)") from None
        self.slab = Slab(self.segment.slots, num_slots, cfg.slot_bytes, name=self.name, ttl_s=cfg.ttl_s,
                         on_evict=self._on_evict)
        self._evicted: list[Evicted] = []
        self._evicted_lock = threading.Lock()
        # Read at scrape time: engines on this host commit slots through the slab sessions, not
        # through this tier's methods, and an in-memory count is cheap to take.
        tier_metrics.BLOCKS_HELD.labels(self.name).set_function(lambda: self._held().blocks)
        tier_metrics.BYTES_HELD.labels(self.name).set_function(lambda: self._held().bytes)

    @property
    def slot_bytes(self) -> int:
        return self.slab.slot_bytes

    def get(self, namespace: str, keys: Sequence[bytes]) -> list[SealedBlock | None]:
        leased = self.slab.acquire_each(namespace, keys)
        try:
            return [None if block is None else
                    SealedBlock(bytes(self.slab.view(block.slot)[:block.length]), block.checksum, block.length,
                                block.expires_at)
                    for block in leased]
        finally:
            self.slab.release([block.slot for block in leased if block is not None])

    def contains(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        return self.slab.contains(namespace, keys)

    def put(self, namespace: str, blocks: Sequence[tuple[bytes, SealedBlock]]) -> list[Evicted]:
        fitting = [(key, block) for key, block in blocks if len(block.payload) <= self.slot_bytes]
        slots = self.slab.allocate(len(fitting))
        placed = fitting[:len(slots)]
        for (_, block), slot in zip(placed, slots):
            self.slab.view(slot)[:len(block.payload)] = block.payload
        # Committed last to first, so the head of a chain is the most recently used.
        self.slab.commit(namespace, [key for key, _ in reversed(placed)], slots[::-1],
                         [block.checksum for _, block in reversed(placed)],
                         [block.expires_at for _, block in reversed(placed)],
                         lengths=[len(block.payload) for _, block in reversed(placed)], replace=True)
        # What does not fit a slot, or finds every slot leased, goes below like an eviction.
        placed_keys = {key for key, _ in placed}
        return [(namespace, key, block) for key, block in blocks if key not in placed_keys] + self.take_evicted()

    def delete(self, namespace: str, keys: Sequence[bytes]) -> int:
        return self.slab.delete(namespace, keys)

    def clear(self, namespace: str) -> int:
        return self.slab.clear(namespace)

    def usage(self) -> dict[str, TierUsage]:
        return self.slab.usage()

    @property
    def has_evicted(self) -> bool:
        """Whether evicted blocks wait for `take_evicted`."""
        return bool(self._evicted)

    def take_evicted(self) -> list[Evicted]:
        """Blocks evicted since the last call, for the store to write down."""
        with self._evicted_lock:
            evicted, self._evicted = self._evicted, []
        return evicted

    def close(self) -> None:
        self.segment.close()

    def _on_evict(self, evicted: list[EvictedSlot]) -> None:
        # Under the slab's lock, before the slots are reused: the bytes must be copied now.
        tier_metrics.EVICTIONS.labels(self.name).inc(len(evicted))
        if not self.evictions_wanted:
            return
        blocks = [(e.namespace, e.key, SealedBlock(bytes(self.slab.view(e.block.slot)[:e.block.length]),
                                                   e.block.checksum, e.block.length, e.block.expires_at))
                  for e in evicted]
        with self._evicted_lock:
            self._evicted += blocks

    def _held(self) -> TierUsage:
        usage = self.slab.usage().values()
        return TierUsage(sum(u.blocks for u in usage), sum(u.bytes for u in usage))
