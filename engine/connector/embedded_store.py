"""The store inside the engine process: a slab of block slots (the CPU tier) over the secondary tiers.

The slab is one host tensor of `[num_slots, block_bytes]`, pinned on CUDA, so the worker moves KV
pages into and out of it by DMA at PCIe speed (kvstore/slab.py keeps the index, LRU and leases).
Redis and S3 sit below it as a `TieredStore`: blocks reach them when a policy names them, or when
the slab evicts them. An evicted block is written down straight from its slot by a thread of its
own, the slot leased until then (kvstore/slab.py, `hold_evicted`): no block bytes are copied in
Python on the way down, so the engine thread never waits for the interpreter behind a copy. A block read from
below is written into a slot first (and kept there when the memory tier is configured: promoted),
so every load ends as one host-to-device copy out of the slab.

Without `cpu_bytes_to_use` there is no memory tier, but the slab still exists, sized for the saves
and loads in flight, as staging between the pages and the lower tiers.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Collection

import numpy as np
import torch

from engine.connector.config import OffloadConfig
from kvstore.checksum import SealedBlock, block_tag, data_checksum
from kvstore.config import ConfigError, parse_tiers
from kvstore.slab import EvictedSlot, Slab, SlotBlock
from kvstore.store import LookupResult, TieredStore, TierUsage

logger = logging.getLogger(__name__)

MEMORY = "memory"
# How long bringing blocks up from a lower tier waits for slab slots being written down (a load
# thread, never the engine's: the request is waiting for its KV anyway).
_PROMOTE_WAIT_S = 2.0
_KEY = "kv_transfer_config.kv_connector_extra_config"


class EmbeddedStore:
    """The slab and the secondary tiers of one engine; lookups are side-effect free."""

    def __init__(self, cfg: OffloadConfig, block_bytes: int, staging_slots: int, pin: bool) -> None:
        self.block_bytes = block_bytes
        self.has_memory_tier = cfg.cpu_bytes_to_use >= block_bytes
        num_slots = max(cfg.cpu_bytes_to_use // block_bytes, staging_slots)
        self.slab_rows = torch.empty((num_slots, block_bytes), dtype=torch.uint8, pin_memory=pin)
        self.lower = (TieredStore(parse_tiers(list(cfg.secondary_tiers)), promote_in_background=True)
                      if cfg.secondary_tiers else None)
        self._write_downs: queue.Queue = queue.Queue()
        self.slab = Slab(self.slab_rows.numpy(), num_slots, block_bytes, name=MEMORY,
                         on_evict=self._on_evict if self.lower is not None else None, hold_evicted=True)
        self._writer = threading.Thread(target=self._write_down_loop, name="kv-write-down", daemon=True)
        self._writer.start()
        logger.info("offloading to an embedded store: %d slots of %.1f MiB%s, tiers %s", num_slots,
                    block_bytes / 2**20, " (pinned)" if pin else "", self.tier_names)

    @property
    def tier_names(self) -> list[str]:
        return ([MEMORY] if self.has_memory_tier else []) + (self.lower.tier_names if self.lower else [])

    @property
    def lower_tier_names(self) -> list[str]:
        return self.lower.tier_names if self.lower else []

    def lookup(self, namespace: str, keys: list[bytes], skip: Collection[str] = ()) -> LookupResult:
        """Leading keys held in some tier but those named in `skip`, and for each the fastest tier
        holding it."""
        in_slab = self.slab.lookup(namespace, keys) if self.has_memory_tier and MEMORY not in skip else 0
        tiers = [MEMORY] * in_slab
        if self.lower is not None and in_slab < len(keys):
            below = self.lower.lookup(namespace, keys[in_slab:], skip)
            tiers += below.tiers
        return LookupResult(len(tiers), tiers)

    # --- what the worker side asks of a slab store (the daemon's client provides the same) ---------
    def allocate(self, count: int, wait_s: float = 0.0) -> list[int]:
        """Lease up to `count` empty slots for blocks about to be written, waiting up to `wait_s`
        for slots whose blocks are being written down."""
        return self.slab.allocate(count, wait_s)

    def acquire(self, namespace: str, keys: list[bytes]) -> list[SlotBlock]:
        """Lease the slots of the leading blocks held in any tier; blocks found only below are
        brought into slots first (and kept in the slab when it is a memory tier: promoted)."""
        blocks = self.slab.acquire(namespace, keys) if self.has_memory_tier else []
        if len(blocks) < len(keys) and self.lower is not None:
            blocks += self._promote(namespace, keys[len(blocks):])
        return blocks

    def commit(self, namespace: str, keys: list[bytes], slots: list[int], checksums: list[int],
               expires_at: float | None, tiers: list[str] | None) -> int:
        """Store blocks written into allocated slots in `tiers` (None: the first tier) and end their
        leases; the number stored."""
        tiers = tiers if tiers is not None else self.tier_names[:1]
        lower = [t for t in tiers if t != MEMORY]
        stored = 0
        if MEMORY in tiers and self.has_memory_tier:
            self.slab.commit(namespace, keys, slots, checksums, [expires_at] * len(slots), keep_lease=True)
            stored = len(slots)
        try:
            if lower:
                blocks = [(key, self.slab.view(slot), c, expires_at) for key, slot, c in zip(keys, slots, checksums)]
                stored = max(stored, self._write_lower(namespace, blocks, lower))
        finally:
            self.slab.release(slots)
        return stored

    def release(self, slots: list[int]) -> None:
        self.slab.release(slots)

    def delete(self, namespace: str, keys: list[bytes]) -> None:
        """Drop copies that failed their check (from the slab; a lower tier checks its own)."""
        self.slab.delete(namespace, keys)

    def view(self, slot: int) -> memoryview:
        return self.slab.view(slot)

    def _promote(self, namespace: str, keys: list[bytes]) -> list[SlotBlock]:
        found = []
        for block in self.lower.get_sealed(namespace, keys):
            if block is None or len(block.payload) != self.block_bytes:
                break
            found.append(block)
        slots = self.slab.allocate(len(found), _PROMOTE_WAIT_S)
        rows = self.slab_rows.numpy()
        blocks = []
        for block, slot in zip(found, slots):
            # numpy copies without holding the interpreter (a memoryview assignment holds it).
            np.copyto(rows[slot], np.frombuffer(block.payload, dtype=np.uint8))
            blocks.append(SlotBlock(slot, block.checksum, block.expires_at))
        if blocks and self.has_memory_tier:
            self.slab.commit(namespace, keys[:len(blocks)], slots, [b.checksum for b in blocks],
                             [b.expires_at for b in blocks], keep_lease=True)
        return blocks

    def _write_lower(self, namespace: str, blocks: list[tuple[bytes, memoryview, int, float | None]],
                     tiers: list[str]) -> int:
        """Write blocks from leased slots (not copied: the leases last until this returns)."""
        sealed = [(key, SealedBlock.seal(payload, namespace, key, expires_at, checksum=checksum, borrow=True))
                  for key, payload, checksum, expires_at in blocks]
        return self.lower.put_sealed(namespace, sealed, tiers=tiers)

    def _on_evict(self, evicted: list[EvictedSlot]) -> None:
        # Under the slab's lock: the slots stay leased to the writer until their blocks are down.
        self._write_downs.put(evicted)

    def _write_down_loop(self) -> None:
        while (batch := self._write_downs.get()) is not None:
            try:
                by_namespace: dict[str, list] = {}
                for e in batch:
                    by_namespace.setdefault(e.namespace, []).append(
                        (e.key, self.slab.view(e.block.slot), e.block.checksum, e.block.expires_at))
                for namespace, blocks in by_namespace.items():
                    self._write_lower(namespace, blocks, self.lower_tier_names[:1])
            except Exception:  # noqa: BLE001 - a failed write-down loses those blocks, never the writer
                logger.exception("writing %d evicted block(s) down failed", len(batch))
            finally:
                self.slab.release([e.block.slot for e in batch])

    def verify_host(self, namespace: str, key: bytes, slot: int, checksum: int, expires_at: float | None) -> bool:
        """Check one slot on the host (for a block whose pages are only partly copied to the device)."""
        view = self.slab.view(slot)
        return data_checksum(view) ^ block_tag(namespace, key, len(view), expires_at) == checksum

    def stats(self) -> dict[str, dict[str, TierUsage]]:
        """namespace -> tier name -> blocks and bytes held."""
        out: dict[str, dict[str, TierUsage]] = {}
        if self.has_memory_tier:
            for namespace, usage in self.slab.usage().items():
                out.setdefault(namespace, {})[MEMORY] = usage
        if self.lower is not None:
            for namespace, tiers in self.lower.stats().items():
                out.setdefault(namespace, {}).update(tiers)
        return out

    def health(self) -> dict[str, bool]:
        return ({MEMORY: True} if self.has_memory_tier else {}) | (self.lower.health() if self.lower else {})

    def close(self) -> None:
        self._write_downs.put(None)
        self._writer.join(timeout=10)
        if self.lower is not None:
            self.lower.close()


def check_unreachable(store: EmbeddedStore) -> None:
    """A secondary tier that does not answer at start-up is a configuration error naming it."""
    down = [name for name, up in store.health().items() if not up]
    if down:
        store.close()
        index = store.lower_tier_names.index(down[0])
        raise ConfigError(f"{_KEY}.secondary_tiers.{index}: tier {down[0]!r} is unreachable")
