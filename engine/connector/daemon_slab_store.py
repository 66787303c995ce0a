"""The same-host kvstore daemon's slab as the connector's store: KV pages DMA'd into the daemon's slots.

When the daemon runs on this host and its memory tier is a slab whose slots are exactly this
engine's offloaded block (`slot_bytes` = block bytes), the engine maps that slab
(kvstore/slab_client.py), registers it with CUDA as pinned memory (engine/connector/pinned_segments.py),
and `SlabTransfer` moves blocks between the GPU and the daemon's slots as it does with the embedded
slab: gRPC carries only slot numbers, lookups and commits, never block bytes. Every engine on the host
maps the same slab, so engine B loads engine A's blocks from the very slots A wrote, at PCIe speed.

This class is the store interface `SlabTransfer` uses (the embedded one is
engine/connector/embedded_store.py). `allocate` runs on the engine thread when a step saves, so it
gets the short lookup deadline, and after a failure allocations are skipped for a while (the saves
count as dropped) rather than stalling every step on a daemon that does not answer. Lookups, deletes
and stats go through the short-deadline lookup client.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from itertools import takewhile

import torch

from engine.connector.pinned_segments import PinnedSegments
from kvstore.backoff import Backoff, Cooldown
from kvstore.checksum import block_tag, data_checksum
from kvstore.client import KVStoreClient, RetryPolicy
from kvstore.slab import SlotBlock
from kvstore.slab_client import SlabClient, SlabRefused
from kvstore.store import LookupResult, TierUsage

logger = logging.getLogger(__name__)

# After a failed allocation, saves skip the daemon this long, doubling per failure.
_ALLOCATE_BACKOFF = Backoff(initial_s=0.5, max_s=10.0)


class DaemonSlabStore:
    """The daemon's slab, mapped into this engine, and its tiers through the daemon."""

    def __init__(self, slab: SlabClient, lookups: KVStoreClient, pinned: PinnedSegments | None,
                 tier_names: list[str], allocate_timeout_s: float) -> None:
        self.slab = slab
        self.block_bytes = slab.slot_bytes
        self.slab_rows = torch.frombuffer(slab.slots, dtype=torch.uint8).view(slab.num_slots, slab.slot_bytes)
        self.tier_names = tier_names
        self.has_memory_tier = True
        self._lookups = lookups
        self._pinned = pinned
        self._allocate_timeout_s = allocate_timeout_s
        self._allocate_cooldown = Cooldown(_ALLOCATE_BACKOFF)

    @classmethod
    def connect(cls, url: str, token: str | None, block_bytes: int, pin: bool, tier_names: list[str],
                lookup_timeout_s: float, transfer_timeout_s: float) -> "DaemonSlabStore":
        """Attach and map the daemon's slab; SlabRefused (saying why) when it cannot serve this engine."""
        pinned = PinnedSegments() if pin else None
        slab = SlabClient(url, token=token, timeout_s=transfer_timeout_s,
                          mapped=pinned.register if pinned else None, unmapping=pinned.unregister if pinned else None)
        if slab.slot_bytes != block_bytes:
            slab.close()
            raise SlabRefused(f"its slot_bytes is {slab.slot_bytes}, this engine's offloaded blocks are {block_bytes} "
                              f"bytes (block_size tokens x layers x 2 x kv_heads x head_dim x dtype bytes): set the "
                              f"daemon's slot_bytes to {block_bytes}")
        # On the scheduler's path: a hung daemon costs one deadline, never a retry loop.
        lookups = KVStoreClient(url, token=token, timeout_s=lookup_timeout_s, retry=RetryPolicy(attempts=1))
        return cls(slab, lookups, pinned, tier_names, lookup_timeout_s)

    def lookup(self, namespace: str, keys: list[bytes], skip: Collection[str] = ()) -> LookupResult:
        """The daemon's Lookup; it asks each of its tiers (`skip` is for an embedded store's tiers)."""
        return self._lookups.lookup(namespace, keys)

    # --- what SlabTransfer asks of a slab store ---------------------------------------------------
    def allocate(self, count: int) -> list[int]:
        """Lease up to `count` empty slots; [] while the daemon fails (backing off) or is detached."""
        if not self._allocate_cooldown.ready():
            return []
        try:
            slots = self.slab.allocate(count, timeout=self._allocate_timeout_s)
        except Exception as e:  # noqa: BLE001 - on the engine thread: a failed save, never a failed step
            logger.warning("leasing %d slab slot(s) failed: %s; saves skip the daemon for %.1f s", count, e,
                           self._allocate_cooldown.failed())
            return []
        self._allocate_cooldown.succeeded()
        return slots

    def acquire(self, namespace: str, keys: list[bytes]) -> list[SlotBlock]:
        """Lease the slots of the leading blocks the daemon holds (it brings blocks from its lower
        tiers into slots first); a block that does not fill its slot (put by a payload client) ends them."""
        blocks = self.slab.acquire(namespace, keys)
        whole = list(takewhile(lambda b: b.length == self.block_bytes, blocks))
        self.release([b.slot for b in blocks[len(whole):]])
        return whole

    def commit(self, namespace: str, keys: list[bytes], slots: list[int], checksums: list[int],
               expires_at: float | None, tiers: list[str] | None) -> int:
        return self.slab.commit(namespace, keys, slots, checksums, [expires_at] * len(slots), tiers=tiers)

    def release(self, slots: list[int]) -> None:
        if not slots:
            return
        try:
            self.slab.release(slots)
        except Exception as e:  # noqa: BLE001 - the daemon frees them when the session ends
            logger.warning("releasing %d slab slot(s) failed: %s", len(slots), e)

    def delete(self, namespace: str, keys: list[bytes]) -> None:
        """Drop copies that failed their check (the daemon deletes them from every tier)."""
        try:
            self._lookups.delete(namespace, keys)
        except Exception as e:  # noqa: BLE001 - the bad copy stays; the next load checks it again
            logger.warning("deleting %d corrupt block(s) failed: %s", len(keys), e)

    def view(self, slot: int) -> memoryview:
        return self.slab.view(slot)

    def verify_host(self, namespace: str, key: bytes, slot: int, checksum: int, expires_at: float | None) -> bool:
        """Check one slot on the host (for a block whose pages are only partly copied to the device)."""
        view = self.slab.view(slot)
        return data_checksum(view) ^ block_tag(namespace, key, len(view), expires_at) == checksum

    def stats(self) -> dict[str, dict[str, TierUsage]]:
        return self._lookups.stats()

    def health(self) -> dict[str, bool]:
        return self._lookups.health()

    def close(self) -> None:
        self.slab.close()
        if self._pinned is not None:
            self._pinned.close()
        self._lookups.close()
