"""TieredStore: KV-cache blocks across ordered tiers (memory → Redis → S3, any subset, any order).

Reads walk the tiers fastest first and take each block from the first tier that holds an intact
copy; a copy that fails its checksum (which binds it to the namespace and key it is read under, see
kvstore/checksum.py) or has expired is deleted from that tier and the walk goes on below. A hit
below the first tier is promoted (copied up) into every faster tier. Writes go to the tiers the
caller names (default: the first); blocks a tier evicts to stay in its budget are written down to
the next tier unless already there. A block is checksummed once, when it is sealed (by `put`, or by
the caller for `put_sealed`); promotion and write-down move the `SealedBlock` as it is. A tier that
fails is a miss for reads and is skipped for writes (see `tiers.guard`): nothing a tier does can
raise out of these methods.

A Delete (or Clear) wins over a promotion of the same key that it races: the Get may have read the
block below before the Delete removed it there, and copy it up after the Delete removed it above.
`_DeleteFence` counts the deletes begun and finished per key stripe; a promotion that sees any delete
activity on its keys between its first read and the end of its writes takes its copies back out.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kvstore import tier_metrics
from kvstore.checksum import SealedBlock
from kvstore.config import ConfigError, StoreConfig, TierConfig, check_expires_at, check_ttl_s, parse_tiers
from kvstore.tiers import Tier, TierUsage, build_tier
from kvstore.tiers.base import Evicted
from kvstore.tiers.guard import TierGuard

log = logging.getLogger(__name__)

__all__ = ["LookupResult", "TieredStore", "TierUsage"]

# Keys share delete counters by hash stripe: bounded memory, and a collision only undoes a promotion.
_DELETE_STRIPES = 4096


def _validated(tiers: Sequence[TierConfig | dict]) -> list[TierConfig]:
    """Tier configs from models or raw dicts (the engine passes its JSON objects)."""
    if not tiers:
        raise ConfigError("tiers: expected at least one tier")
    if all(isinstance(t, dict) for t in tiers):
        return parse_tiers(list(tiers))
    configs = [parse_tiers([t])[0] if isinstance(t, dict) else t for t in tiers]
    names = [cfg.tier_name for cfg in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"tiers: tier names must be unique, got {names} (add a 'name:' key)")
    return configs


class _DeleteFence:
    """Delete and Clear activity per key stripe, for promotions to check against (see the module doc)."""

    _CLEAR = _DELETE_STRIPES   # the counters of Clears, which fence every key

    def __init__(self):
        self._lock = threading.Lock()
        self._started = [0] * (_DELETE_STRIPES + 1)
        self._finished = [0] * (_DELETE_STRIPES + 1)

    def snapshot(self, namespace: str, keys: Sequence[bytes]) -> list[tuple[int, ...]]:
        """Per key: the deletes (and Clears) begun and finished so far."""
        c = self._CLEAR
        with self._lock:
            return [(self._started[s], self._finished[s], self._started[c], self._finished[c])
                    for s in self._stripes(namespace, keys)]

    def disturbed(self, namespace: str, keys: Sequence[bytes], since: list[tuple[int, ...]]) -> list[bool]:
        """Per key: whether a delete began or finished after `since`, or is running now."""
        return [now != then or now[0] != now[1] or now[2] != now[3]
                for now, then in zip(self.snapshot(namespace, keys), since)]

    @contextlib.contextmanager
    def deleting(self, namespace: str | None, keys: Sequence[bytes]) -> Iterator[None]:
        """Around one Delete of `keys` from every tier; namespace None: a Clear."""
        stripes = [self._CLEAR] if namespace is None else sorted(set(self._stripes(namespace, keys)))
        with self._lock:
            for stripe in stripes:
                self._started[stripe] += 1
        try:
            yield
        finally:
            with self._lock:
                for stripe in stripes:
                    self._finished[stripe] += 1

    @staticmethod
    def _stripes(namespace: str, keys: Sequence[bytes]) -> list[int]:
        return [hash((namespace, key)) % _DELETE_STRIPES for key in keys]


@dataclass(frozen=True)
class LookupResult:
    """How many leading keys are present, and for each the fastest tier holding it."""

    num_hits: int
    tiers: list[str]


class TieredStore:
    """An in-process multi-tier block store; thread-safe.

    `promote_in_background`: a read's copies into the faster tiers are written by a thread of the
    store's own after the read returns (the engine's loads: a hit from S3 waited for its copy into
    Redis, 0.3 s for 90 MiB, before the engine could use it); otherwise before it returns.
    """

    def __init__(self, tiers: Sequence[TierConfig | dict], *, promote_on_hit: bool = True,
                 promote_in_background: bool = False):
        configs = _validated(tiers)
        self.promote_on_hit = promote_on_hit
        self._promoter = (ThreadPoolExecutor(1, thread_name_prefix="kv-promote")
                          if promote_in_background else None)
        self._tiers: list[Tier] = []
        try:
            for cfg in configs:
                self._tiers.append(build_tier(cfg))
        except Exception:
            self.close()
            raise
        self._guards = [TierGuard(tier.name) for tier in self._tiers]
        self._index = {tier.name: i for i, tier in enumerate(self._tiers)}
        self._tiers[-1].evictions_wanted = False   # past the last tier evicted blocks are dropped
        self._fence = _DeleteFence()

    @classmethod
    def from_config(cls, cfg: StoreConfig) -> "TieredStore":
        return cls(cfg.tiers, promote_on_hit=cfg.promote_on_hit)

    @property
    def tier_names(self) -> list[str]:
        return [tier.name for tier in self._tiers]

    def lookup(self, namespace: str, keys: list[bytes], skip: Collection[str] = ()) -> LookupResult:
        """Leading keys present in any tier but those named in `skip` (existence only; `get`
        verifies the bytes)."""
        located: list[str | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        for t, tier in enumerate(self._tiers):
            if not pending:
                break
            if tier.name in skip:
                continue
            asked = [keys[i] for i in pending]
            present = self._guards[t].call("contains", lambda: tier.contains(namespace, asked), [False] * len(asked))
            for i, hit in zip(pending, present):
                if hit:
                    located[i] = tier.name
            pending = [i for i in pending if located[i] is None]
        num_hits = next((i for i, name in enumerate(located) if name is None), len(keys))
        return LookupResult(num_hits, [name for name in located[:num_hits] if name is not None])

    def get(self, namespace: str, keys: list[bytes]) -> list[bytes | None]:
        """Payloads in key order; None for a miss (absent, expired, failed checksum, tier down)."""
        return [block.payload if block is not None else None for block in self.get_sealed(namespace, keys)]

    def get_sealed(self, namespace: str, keys: list[bytes]) -> list[SealedBlock | None]:
        """Like `get`, but each hit is the stored `SealedBlock`: its payload with the checksum and
        expiry it was put with, for a caller that checks the bytes again where it lands them (the
        engine, on the GPU, against `block.checksum`)."""
        return self._get_sealed(namespace, keys, 0)

    def get_sealed_below(self, namespace: str, keys: list[bytes], tier: str) -> list[SealedBlock | None]:
        """Like `get_sealed` over the tiers after `tier` only, promoting among them but not into
        `tier` (the daemon places these blocks in its slab itself, under a lease)."""
        return self._get_sealed(namespace, keys, self._tier_indexes([tier])[0] + 1)

    def _get_sealed(self, namespace: str, keys: list[bytes], first: int) -> list[SealedBlock | None]:
        found: list[SealedBlock | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        promotions: list[tuple[int, list[tuple[bytes, SealedBlock]]]] = []
        fenced = self._fence.snapshot(namespace, keys) if self.promote_on_hit else []
        now = time.time()
        for t, tier in enumerate(self._tiers[first:], start=first):
            if not pending:
                break
            asked = [keys[i] for i in pending]
            blocks = self._guards[t].call("get", lambda: tier.get(namespace, asked), [None] * len(asked))
            still, bad, hits = [], [], []
            for i, block in zip(pending, blocks):
                if block is None:
                    still.append(i)
                elif block.expired(now) or (tier.verify_reads and not block.intact(namespace, keys[i])):
                    if not block.expired(now):
                        tier_metrics.CORRUPT.labels(tier.name).inc()
                        log.warning("block failed its checksum in tier %s (namespace %s); deleted", tier.name, namespace)
                    bad.append(keys[i])
                    still.append(i)
                else:
                    found[i] = block
                    hits.append((keys[i], block))
            self._count_reads(tier.name, hits, len(still))
            if bad:
                self._guards[t].call("delete", lambda: tier.delete(namespace, bad), 0)
            if hits and t > first and self.promote_on_hit:
                promotions.append((t, hits))
            pending = still
        if promotions:
            since = dict(zip(keys, fenced))
            if self._promoter is not None:
                self._promoter.submit(self._promote_all, namespace, promotions, first, since)
            else:
                self._promote_all(namespace, promotions, first, since)
        return found

    def _promote_all(self, namespace: str, promotions: list[tuple[int, list[tuple[bytes, SealedBlock]]]],
                     top: int, since: dict[bytes, tuple[int, ...]]) -> None:
        try:
            for t, hits in promotions:
                self._promote(namespace, t, hits, top, [since[key] for key, _ in hits])
        except Exception:  # noqa: BLE001 - a promotion is an optimisation; the blocks stay where they were
            log.warning("promoting %d block(s) of namespace %s failed", sum(len(h) for _, h in promotions),
                        namespace, exc_info=True)

    def put(
        self,
        namespace: str,
        blocks: list[tuple[bytes, bytes]],
        *,
        tiers: list[str] | None = None,
        ttl_s: float | None = None,
    ) -> int:
        """Store blocks in the named tiers (None = the first tier); the number stored. Idempotent."""
        targets = self._targets(tiers)
        check_ttl_s(ttl_s)
        expires_at = time.time() + ttl_s if ttl_s is not None else None
        sealed = [(key, SealedBlock.seal(payload, namespace, key, expires_at)) for key, payload in blocks]
        return self._store(namespace, targets, sealed)

    def put_sealed(
        self,
        namespace: str,
        blocks: list[tuple[bytes, SealedBlock]],
        *,
        tiers: list[str] | None = None,
        ttl_s: float | None = None,
    ) -> int:
        """Store blocks whose checksum the caller already computed (`SealedBlock.seal(payload,
        namespace, key, expires_at, checksum=...)`); the payloads are not read again here. With
        `ttl_s`, each block is rebound to expire `ttl_s` from now; without, it keeps its own
        `expires_at`. A block whose checksum is wrong is stored and then a miss on every read."""
        targets = self._targets(tiers)
        check_ttl_s(ttl_s)
        if ttl_s is not None:
            expires_at = time.time() + ttl_s
            blocks = [(key, block.with_expiry(namespace, key, expires_at)) for key, block in blocks]
        else:
            now = time.time()
            for i, (_, block) in enumerate(blocks):
                check_expires_at(block.expires_at, now, f"blocks[{i}].expires_at")
        return self._store(namespace, targets, blocks)

    def delete(self, namespace: str, keys: list[bytes]) -> int:
        """Remove keys from every tier; the number of keys that were present in some tier."""
        present = [False] * len(keys)
        with self._fence.deleting(namespace, keys):
            for t, tier in enumerate(self._tiers):
                held = self._guards[t].call("contains", lambda: tier.contains(namespace, keys), [False] * len(keys))
                present = [a or b for a, b in zip(present, held)]
                self._guards[t].call("delete", lambda: tier.delete(namespace, keys), 0)
        return sum(present)

    def clear(self, namespace: str) -> int:
        """Remove a namespace from every tier; the most blocks removed from any one tier
        (a block held by several tiers is one block, and tiers cannot cheaply tell which)."""
        removed = 0
        with self._fence.deleting(None, []):
            for t, tier in enumerate(self._tiers):
                removed = max(removed, self._guards[t].call("clear", lambda: tier.clear(namespace), 0))
        return removed

    def write_down(self, tier: str, evicted: list[Evicted]) -> None:
        """Write blocks `tier` evicted outside a put (the slab's leases) to the tier below it."""
        if evicted:
            self._write_down(self._tier_indexes([tier])[0] + 1, evicted)

    def tier(self, name: str) -> Tier:
        return self._tiers[self._tier_indexes([name])[0]]

    def stats(self) -> dict[str, dict[str, TierUsage]]:
        """namespace -> tier name -> blocks and payload bytes held (tiers that are down are left out)."""
        by_namespace: dict[str, dict[str, TierUsage]] = defaultdict(dict)
        for t, tier in enumerate(self._tiers):
            usage = self._guards[t].call("usage", tier.usage, None)
            if usage is None:
                continue
            for namespace, held in usage.items():
                by_namespace[namespace][tier.name] = held
            tier_metrics.BLOCKS_HELD.labels(tier.name).set(sum(u.blocks for u in usage.values()))
            tier_metrics.BYTES_HELD.labels(tier.name).set(sum(u.bytes for u in usage.values()))
        return dict(by_namespace)

    def health(self) -> dict[str, bool]:
        """tier name -> whether it answers now (pings each tier)."""
        return {tier.name: guard.probe(tier.ping) for tier, guard in zip(self._tiers, self._guards)}

    def close(self) -> None:
        if self._promoter is not None:
            self._promoter.shutdown(wait=True)
        for tier in self._tiers:
            try:
                tier.close()
            except Exception:  # noqa: BLE001 - closing the rest matters more
                log.warning("closing tier %s failed", tier.name, exc_info=True)

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tier_indexes(self, names: list[str]) -> list[int]:
        unknown = [name for name in names if name not in self._index]
        if unknown:
            raise ValueError(f"tiers: unknown tier name(s) {unknown}; configured: {self.tier_names}")
        return sorted({self._index[name] for name in names})

    def _targets(self, tiers: list[str] | None) -> list[int]:
        """Indexes of the tiers a put writes to (None = the first tier)."""
        return [0] if tiers is None else self._tier_indexes(tiers)

    def _store(self, namespace: str, targets: list[int], blocks: list[tuple[bytes, SealedBlock]]) -> int:
        if not blocks:
            return 0
        stored = False
        # Slowest tier first, so blocks a faster tier evicts are already below and not written twice.
        for t in reversed(targets):
            stored |= self._put_into(namespace, t, blocks)
        return len(blocks) if stored else 0

    def _put_into(self, namespace: str, t: int, blocks: list[tuple[bytes, SealedBlock]]) -> bool:
        """Write into tier t and write its evictions down; whether tier t took the blocks."""
        tier = self._tiers[t]
        evicted = self._guards[t].call("put", lambda: tier.put(namespace, blocks), None)
        if evicted is None:
            return False
        tier_metrics.BYTES_IN.labels(tier.name).inc(sum(len(block.payload) for _, block in blocks))
        if evicted:
            self._write_down(t + 1, evicted)
        return True

    def _write_down(self, t: int, evicted: list[Evicted]) -> None:
        """Give evicted blocks to tier t unless it already holds them (dropped past the last tier)."""
        if t >= len(self._tiers):
            return
        tier, guard = self._tiers[t], self._guards[t]
        by_namespace: dict[str, list[tuple[bytes, SealedBlock]]] = defaultdict(list)
        for namespace, key, block in evicted:
            by_namespace[namespace].append((key, block))
        for namespace, blocks in by_namespace.items():
            keys = [key for key, _ in blocks]
            held = guard.call("contains", lambda: tier.contains(namespace, keys), None)
            if held is None:
                continue
            missing = [entry for entry, present in zip(blocks, held) if not present]
            if missing and self._put_into(namespace, t, missing):
                tier_metrics.DEMOTIONS.labels(tier.name).inc(len(missing))

    def _promote(self, namespace: str, found_in: int, hits: list[tuple[bytes, SealedBlock]], top: int,
                 since: list[tuple[int, ...]]) -> None:
        """Copy hits up into tiers top..found_in-1; take back the copies of keys a delete touched
        since `since` (their fence snapshot, taken before the read that found them)."""
        promoted = [t for t in range(found_in - 1, top - 1, -1) if self._put_into(namespace, t, hits)]
        for t in promoted:
            tier_metrics.PROMOTIONS.labels(self._tiers[t].name).inc(len(hits))
        keys = [key for key, _ in hits]
        deleted = [key for key, hit in zip(keys, self._fence.disturbed(namespace, keys, since)) if hit]
        if deleted:
            for t in promoted:
                tier = self._tiers[t]
                self._guards[t].call("delete", lambda: tier.delete(namespace, deleted), 0)

    @staticmethod
    def _count_reads(tier_name: str, hits: list[tuple[bytes, SealedBlock]], misses: int) -> None:
        if hits:
            tier_metrics.HITS.labels(tier_name).inc(len(hits))
            tier_metrics.BYTES_OUT.labels(tier_name).inc(sum(len(block.payload) for _, block in hits))
        if misses:
            tier_metrics.MISSES.labels(tier_name).inc(misses)
