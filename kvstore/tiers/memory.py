"""The CPU memory tier: a byte budget and prefix-aware LRU eviction.

Eviction policy — LRU, touched tail-first. Within one get or put the blocks of a chain are touched
from the last to the first, so the head of a chain (key 0, the system prompt or shared document
every request starts with) is the most recently used and the tail ages out first. Plain LRU in
key order would do the opposite: it evicts block 0 first, and since a lookup stops at the first
miss, one evicted head hides every block after it. LRU rather than ARC/2Q because the engine's
traffic is dominated by recency (chat turns, agent loops re-sending the last prompt) and an
OrderedDict makes every touch O(1) under one short lock. Evicted blocks are returned to the store,
which writes them down to the next tier if they are not already there.

Copy-light: a block's payload is the `bytes` object that was put (a mutable buffer is copied once
when sealed) and `get` returns that same object.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

from kvstore import tier_metrics
from kvstore.checksum import SealedBlock
from kvstore.config import MemoryTierConfig
from kvstore.tiers.base import Evicted, Tier, TierUsage


class MemoryTier(Tier):
    """Blocks in this process's memory under a byte budget."""

    def __init__(self, cfg: MemoryTierConfig):
        self.name = cfg.tier_name
        self.budget = cfg.bytes
        self.ttl_s = cfg.ttl_s
        self.verify_reads = cfg.verify_reads
        self._lock = threading.Lock()
        # (namespace, key) -> (block, deadline); order = least recently used first.
        self._entries: OrderedDict[tuple[str, bytes], tuple[SealedBlock, float | None]] = OrderedDict()
        self._used = 0
        self._per_namespace: dict[str, list[int]] = {}

    def get(self, namespace: str, keys: Sequence[bytes]) -> list[SealedBlock | None]:
        found: list[SealedBlock | None] = [None] * len(keys)
        now = time.time()
        with self._lock:
            for i in range(len(keys) - 1, -1, -1):
                entry = self._live(namespace, keys[i], now)
                if entry is not None:
                    self._entries.move_to_end((namespace, keys[i]))
                    found[i] = entry[0]
        return found

    def contains(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        now = time.time()
        with self._lock:
            return [self._live(namespace, key, now) is not None for key in keys]

    def put(self, namespace: str, blocks: Sequence[tuple[bytes, SealedBlock]]) -> list[Evicted]:
        evicted: list[Evicted] = []
        now = time.time()
        with self._lock:
            for key, block in reversed(blocks):
                self._remove((namespace, key))
                if len(block.payload) > self.budget:
                    evicted.append((namespace, key, block))
                    continue
                self._entries[(namespace, key)] = (block, self._deadline(block, now))
                self._account(namespace, 1, len(block.payload))
            while self._used > self.budget:
                (ns, key), (block, deadline) = self._entries.popitem(last=False)
                self._account(ns, -1, -len(block.payload))
                if deadline is None or deadline > now:
                    evicted.append((ns, key, block))
            self._publish()
        if evicted:
            tier_metrics.EVICTIONS.labels(self.name).inc(len(evicted))
        return evicted

    def delete(self, namespace: str, keys: Sequence[bytes]) -> int:
        with self._lock:
            removed = sum(self._remove((namespace, key)) for key in keys)
            self._publish()
        return removed

    def clear(self, namespace: str) -> int:
        with self._lock:
            doomed = [entry for entry in self._entries if entry[0] == namespace]
            for entry in doomed:
                self._remove(entry)
            self._publish()
        return len(doomed)

    def usage(self) -> dict[str, TierUsage]:
        with self._lock:
            return {ns: TierUsage(blocks, size) for ns, (blocks, size) in self._per_namespace.items()}

    def _deadline(self, block: SealedBlock, now: float) -> float | None:
        if self.ttl_s is None:
            return block.expires_at
        own = now + self.ttl_s
        return own if block.expires_at is None else min(own, block.expires_at)

    def _live(self, namespace: str, key: bytes, now: float) -> tuple[SealedBlock, float | None] | None:
        entry = self._entries.get((namespace, key))
        if entry is not None and entry[1] is not None and entry[1] <= now:
            self._remove((namespace, key))
            return None
        return entry

    def _remove(self, entry_key: tuple[str, bytes]) -> bool:
        entry = self._entries.pop(entry_key, None)
        if entry is None:
            return False
        self._account(entry_key[0], -1, -len(entry[0].payload))
        return True

    def _account(self, namespace: str, blocks: int, size: int) -> None:
        counts = self._per_namespace.setdefault(namespace, [0, 0])
        counts[0] += blocks
        counts[1] += size
        self._used += size
        if counts[0] == 0:
            del self._per_namespace[namespace]

    def _publish(self) -> None:
        tier_metrics.BLOCKS_HELD.labels(self.name).set(len(self._entries))
        tier_metrics.BYTES_HELD.labels(self.name).set(self._used)
