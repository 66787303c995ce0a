"""The CPU tier as a slab: fixed-size block slots in one host buffer, and an index over slot numbers.

A block never lives in a Python object: its bytes sit in a slot of one big buffer (pinned host
memory in the engine, a shared-memory segment in the daemon), and DMA moves them between GPU pages
and slots directly. What this class keeps is metadata only: which (namespace, key) is in which
slot, its checksum and expiry, an LRU order, and leases.

A lease keeps a slot's bytes from changing while someone reads or writes them: `allocate` leases
empty slots for a save, `acquire` leases the slots of present blocks for a load (`acquire_each`:
of every present block, for a reader that wants any subset, not a prefix). Eviction never
takes a leased slot; a block deleted or replaced while leased keeps its slot until the last lease
goes, then the slot is free. So a DMA in flight always reads or writes the bytes it was given.

Eviction is LRU, touched tail-first: within one acquire the blocks of a chain are touched from last
to first, so the head of a chain (the shared system prompt every request starts with) is the most
recently used and tails age out first. A lookup stops at the first miss, so losing a head would
hide every block after it.

Writing evicted blocks down (`hold_evicted`): the slots of the blocks an `allocate` pushes out stay
leased to the evictor, which writes their bytes to a lower tier straight from the slot and then
`release`s them; only then are they free. So no block is copied out of its slot under the lock
(copying a 28 MiB block into fresh memory held the interpreter for ~10 ms, and an allocate that
evicted a dozen stalled every other thread of the process for over 100 ms). Such an allocate hands
out the slots free now and evicts ahead of demand (`headroom` slots), so a steady stream of saves
finds slots freed by earlier write-downs; a caller that may wait (`wait_s`) waits for them.

A block fills its slot (the engine's blocks are all `slot_bytes`) unless it was committed with a
shorter `length` (the daemon's payload path stores blocks of any size up to a slot).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvstore.tiers.base import TierUsage

_NO_EXPIRY = float("inf")


@dataclass(frozen=True, slots=True)
class SlotBlock:
    """A block held in a slot: where it is and what it must check against."""

    slot: int
    checksum: int
    expires_at: float | None
    length: int | None = None   # bytes of the slot the block fills; None: all of it


@dataclass(frozen=True, slots=True)
class EvictedSlot:
    """A block pushed out of the slab to make room (its slot's bytes are intact during `on_evict`)."""

    namespace: str
    key: bytes
    block: SlotBlock


class Slab:
    """`num_slots` slots of `slot_bytes` each over `buffer`; thread-safe.

    `on_evict(evicted)` is called (under the slab's lock, before the slots are reused) with the
    blocks a call pushed out, so a lower tier can take a copy of their bytes; with `hold_evicted`,
    their slots stay leased to the callee until it `release`s them (the module docstring says why).
    """

    def __init__(self, buffer, num_slots: int, slot_bytes: int, *, name: str = "memory",
                 ttl_s: float | None = None, on_evict: Callable[[list[EvictedSlot]], None] | None = None,
                 hold_evicted: bool = False) -> None:
        if num_slots < 1 or slot_bytes < 1:
            raise ValueError(f"slab: num_slots and slot_bytes must be positive, got {num_slots}, {slot_bytes}")
        self.buffer = buffer
        self._view = memoryview(buffer).cast("B")
        if len(self._view) < num_slots * slot_bytes:
            raise ValueError(f"slab: the buffer holds {len(self._view)} bytes, {num_slots} slots need "
                             f"{num_slots * slot_bytes}")
        self.name = name
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.ttl_s = ttl_s
        self._on_evict = on_evict
        self._hold_evicted = hold_evicted and on_evict is not None
        # Slots evicted ahead of demand: enough for a few saves of a long prompt, a small share of the slab.
        self.headroom = max(1, num_slots // 16)
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._held: set[int] = set()   # evicted slots the evictor is writing down
        self._index: dict[tuple[str, bytes], SlotBlock] = {}
        self._owner: list[tuple[str, bytes] | None] = [None] * num_slots   # indexed entry of each slot
        self._deadline = [_NO_EXPIRY] * num_slots
        self._leases = [0] * num_slots
        self._lru: OrderedDict[int, None] = OrderedDict()   # indexed slots, least recently used first
        self._free = list(range(num_slots - 1, -1, -1))     # popped from the end: low slots first
        self._per_namespace: dict[str, list[int]] = {}   # namespace -> [blocks, bytes]

    # --- reads ----------------------------------------------------------------------------------
    def lookup(self, namespace: str, keys: Sequence[bytes]) -> int:
        """How many leading keys are present (no lease, no LRU touch)."""
        now = time.time()
        with self._lock:
            for i, key in enumerate(keys):
                if self._live(namespace, key, now) is None:
                    return i
        return len(keys)

    def contains(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        """Which keys are present (no lease, no LRU touch)."""
        now = time.time()
        with self._lock:
            return [self._live(namespace, key, now) is not None for key in keys]

    def acquire(self, namespace: str, keys: Sequence[bytes]) -> list[SlotBlock]:
        """Lease the slots of the leading present keys; give them back with `release`."""
        now = time.time()
        found: list[SlotBlock] = []
        with self._lock:
            for key in keys:
                block = self._live(namespace, key, now)
                if block is None:
                    break
                found.append(block)
            self._lease(found)
        return found

    def acquire_each(self, namespace: str, keys: Sequence[bytes]) -> list[SlotBlock | None]:
        """Lease the slot of every present key (None for a miss); give them back with `release`."""
        now = time.time()
        with self._lock:
            found = [self._live(namespace, key, now) for key in keys]
            self._lease([block for block in found if block is not None])
        return found

    def view(self, slot: int) -> memoryview:
        """The bytes of one slot (valid while the caller holds a lease on it)."""
        start = slot * self.slot_bytes
        return self._view[start:start + self.slot_bytes]

    # --- writes ---------------------------------------------------------------------------------
    def allocate(self, count: int, wait_s: float = 0.0) -> list[int]:
        """Lease up to `count` empty slots for blocks about to be written; fewer when the rest are
        leased, or (`hold_evicted`) still being written down after `wait_s` seconds."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            slots = self._take_free(count)
            evicted = self._evict(count, slots)
            if evicted and self._on_evict is not None:
                self._on_evict(evicted)
            while len(slots) < count and self._held and (left := deadline - time.monotonic()) > 0:
                self._freed.wait(left)
                slots += self._take_free(count - len(slots))
            for slot in slots:
                self._leases[slot] = 1
        return slots

    def _take_free(self, count: int) -> list[int]:
        n = min(count, len(self._free))
        taken = self._free[len(self._free) - n:][::-1]   # popped from the end: low slots first
        del self._free[len(self._free) - n:]
        return taken

    def _evict(self, count: int, slots: list[int]) -> list[EvictedSlot]:
        """Push out least recently used blocks until `slots` holds `count`; with `hold_evicted`
        also the headroom, and blocks to write down are held instead of handed out."""
        wanted = count - len(slots)
        if self._hold_evicted:
            wanted += max(0, self.headroom - len(self._held) - len(self._free))
        now = time.time()
        evicted: list[EvictedSlot] = []
        for _ in range(wanted):
            victim = next((s for s in self._lru if not self._leases[s]), None)
            if victim is None:
                break
            namespace, key = self._owner[victim]
            write_down = self._deadline[victim] > now   # an expired block is not worth writing down
            if write_down:
                evicted.append(EvictedSlot(namespace, key, self._index[(namespace, key)]))
            self._unindex(victim)
            if write_down and self._hold_evicted:
                self._leases[victim] = 1
                self._held.add(victim)
            elif len(slots) < count:
                slots.append(victim)
            else:
                self._free.append(victim)
        return evicted

    def commit(self, namespace: str, keys: Sequence[bytes], slots: Sequence[int], checksums: Sequence[int],
               expires_at: Sequence[float | None], *, lengths: Sequence[int] | None = None,
               keep_lease: bool = False, replace: bool = False) -> None:
        """Index blocks written into allocated slots (`lengths`: bytes of each; None: whole slots).
        A key already present keeps its older copy (the engine saves the same bytes under the same
        key), unless `replace` (a put that overwrites, as the payload path's tiers do)."""
        lengths = [self.slot_bytes] * len(slots) if lengths is None else lengths
        with self._lock:
            for key, slot, checksum, expires, length in zip(keys, slots, checksums, expires_at, lengths):
                old = self._index.get((namespace, key))
                if old is not None:
                    if not replace:
                        continue
                    self._drop(old.slot)
                block = SlotBlock(slot, checksum, expires, length)
                self._index[(namespace, key)] = block
                self._owner[slot] = (namespace, key)
                self._deadline[slot] = self._deadline_of(block)
                self._lru[slot] = None
                held = self._per_namespace.setdefault(namespace, [0, 0])
                held[0] += 1
                held[1] += length
            if not keep_lease:
                self._release(slots)

    def release(self, slots: Sequence[int]) -> None:
        """End leases taken by `allocate` or `acquire`; a slot no block owns any more becomes free."""
        with self._lock:
            self._release(slots)

    def delete(self, namespace: str, keys: Sequence[bytes]) -> int:
        """Remove keys; the number that were present."""
        with self._lock:
            slots = [block.slot for key in keys if (block := self._index.get((namespace, key))) is not None]
            for slot in slots:
                self._drop(slot)
        return len(slots)

    def clear(self, namespace: str) -> int:
        """Remove every block of one namespace (exactly that name); the number removed."""
        with self._lock:
            slots = [block.slot for (ns, _), block in self._index.items() if ns == namespace]
            for slot in slots:
                self._drop(slot)
        return len(slots)

    def usage(self) -> dict[str, TierUsage]:
        with self._lock:
            return {ns: TierUsage(blocks, size) for ns, (blocks, size) in self._per_namespace.items()}

    @property
    def num_free(self) -> int:
        with self._lock:
            return len(self._free)

    # --- internals (lock held) --------------------------------------------------------------------
    def _deadline_of(self, block: SlotBlock) -> float:
        own = time.time() + self.ttl_s if self.ttl_s is not None else _NO_EXPIRY
        return min(own, block.expires_at if block.expires_at is not None else _NO_EXPIRY)

    def _live(self, namespace: str, key: bytes, now: float) -> SlotBlock | None:
        block = self._index.get((namespace, key))
        if block is not None and self._deadline[block.slot] <= now:
            self._drop(block.slot)
            return None
        return block

    def _lease(self, blocks: list[SlotBlock]) -> None:
        # Touched tail-first: the head of a chain ends up the most recently used.
        for block in reversed(blocks):
            self._leases[block.slot] += 1
            self._lru.move_to_end(block.slot)

    def _unindex(self, slot: int) -> None:
        namespace, key = self._owner[slot]
        block = self._index.pop((namespace, key))
        self._owner[slot] = None
        self._deadline[slot] = _NO_EXPIRY
        del self._lru[slot]
        held = self._per_namespace[namespace]
        held[0] -= 1
        held[1] -= block.length
        if not held[0]:
            del self._per_namespace[namespace]

    def _drop(self, slot: int) -> None:
        self._unindex(slot)
        if not self._leases[slot]:
            self._free.append(slot)

    def _release(self, slots: Sequence[int]) -> None:
        for slot in slots:
            self._leases[slot] -= 1
            if not self._leases[slot] and self._owner[slot] is None:
                self._free.append(slot)
                if slot in self._held:
                    self._held.discard(slot)
                    self._freed.notify_all()
