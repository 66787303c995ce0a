"""The slab's index over slot numbers: hits, leases, LRU eviction tail-first, expiry, deletes under a lease."""

from __future__ import annotations

import threading
import time

from kvstore.slab import Slab

SLOT = 64


def make(num_slots: int = 4, **kwargs) -> tuple[Slab, bytearray]:
    buffer = bytearray(num_slots * SLOT)
    return Slab(buffer, num_slots, SLOT, **kwargs), buffer


def put(slab: Slab, namespace: str, keys: list[bytes], expires_at: float | None = None) -> list[int]:
    slots = slab.allocate(len(keys))
    for key, slot in zip(keys, slots):
        slab.view(slot)[:] = key * (SLOT // len(key))
    slab.commit(namespace, keys[:len(slots)], slots, [7] * len(slots), [expires_at] * len(slots))
    return slots


def test_blocks_are_found_in_their_slots_with_their_checksums():
    slab, _ = make()
    slots = put(slab, "ns", [b"a" * 16, b"b" * 16])
    assert slab.lookup("ns", [b"a" * 16, b"b" * 16, b"c" * 16]) == 2
    assert slab.lookup("other", [b"a" * 16]) == 0
    found = slab.acquire("ns", [b"a" * 16, b"x" * 16, b"b" * 16])
    assert [(b.slot, b.checksum) for b in found] == [(slots[0], 7)]
    assert bytes(slab.view(found[0].slot)) == b"a" * SLOT
    slab.release([b.slot for b in found])


def test_eviction_takes_the_least_recent_unleased_slot_and_reports_it():
    evicted = []
    slab, _ = make(3, on_evict=lambda blocks: evicted.extend((e.key, bytes(slab.view(e.block.slot))) for e in blocks))
    put(slab, "ns", [b"h" * 16, b"m" * 16, b"t" * 16])
    # A chain is touched tail-first, so its head is the most recent and the tail goes first.
    leased = slab.acquire("ns", [b"h" * 16, b"m" * 16, b"t" * 16])
    slab.release([b.slot for b in leased])
    new = slab.allocate(1)
    assert evicted == [(b"t" * 16, b"t" * SLOT)]
    assert slab.lookup("ns", [b"h" * 16, b"m" * 16, b"t" * 16]) == 2
    slab.release(new)


def test_leased_slots_are_never_evicted_or_reused():
    slab, _ = make(2)
    put(slab, "ns", [b"a" * 16, b"b" * 16])
    held = slab.acquire("ns", [b"a" * 16, b"b" * 16])
    assert slab.allocate(1) == []            # everything is leased: nothing to give
    assert slab.delete("ns", [b"a" * 16]) == 1
    assert slab.allocate(1) == []            # deleted, but its slot is still being read
    slab.release([b.slot for b in held])
    assert sorted(slab.allocate(2)) == sorted(b.slot for b in held)


def test_a_key_already_present_keeps_its_copy_and_the_new_slot_is_freed():
    slab, _ = make(2)
    first = put(slab, "ns", [b"a" * 16])
    second = slab.allocate(1)
    slab.commit("ns", [b"a" * 16], second, [9], [None])
    assert [b.slot for b in slab.acquire("ns", [b"a" * 16])] == first
    assert slab.num_free == 1


def test_expired_blocks_are_misses_and_a_tier_ttl_bounds_every_block():
    slab, _ = make(2)
    put(slab, "ns", [b"a" * 16], expires_at=time.time() - 1)
    assert slab.lookup("ns", [b"a" * 16]) == 0
    assert slab.num_free == 2
    short, _ = make(2, ttl_s=0.05)
    put(short, "ns", [b"a" * 16])
    assert short.lookup("ns", [b"a" * 16]) == 1
    time.sleep(0.06)
    assert short.lookup("ns", [b"a" * 16]) == 0


def test_clear_removes_exactly_one_namespace():
    slab, _ = make(4)
    put(slab, "tenant", [b"a" * 16])
    put(slab, "tenant:b", [b"b" * 16])
    assert slab.clear("tenant") == 1
    assert slab.lookup("tenant:b", [b"b" * 16]) == 1
    assert {ns: u.blocks for ns, u in slab.usage().items()} == {"tenant:b": 1}


def test_blocks_shorter_than_a_slot_keep_their_length_and_a_replacing_commit_overwrites():
    slab, _ = make(4)
    slots = slab.allocate(2)
    slab.commit("ns", [b"a" * 16, b"b" * 16], slots, [1, 2], [None, None], lengths=[10, SLOT])
    assert [b.length for b in slab.acquire("ns", [b"a" * 16, b"b" * 16])] == [10, SLOT]
    slab.release(slots)
    assert slab.usage()["ns"].bytes == 10 + SLOT
    newer = slab.allocate(1)
    slab.commit("ns", [b"a" * 16], newer, [3], [None], lengths=[20], replace=True)
    assert [(b.slot, b.checksum, b.length) for b in slab.acquire_each("ns", [b"a" * 16])] == [(newer[0], 3, 20)]
    assert slab.usage()["ns"].bytes == 20 + SLOT and slab.num_free == 2   # the replaced copy's slot is free


def test_contains_and_acquire_each_answer_every_key_not_a_prefix():
    slab, _ = make(4)
    put(slab, "ns", [b"a" * 16, b"c" * 16])
    keys = [b"a" * 16, b"b" * 16, b"c" * 16]
    assert slab.contains("ns", keys) == [True, False, True]
    found = slab.acquire_each("ns", keys)
    assert [b is not None for b in found] == [True, False, True]
    assert len(slab.allocate(4)) == 2   # both hits are leased: only the two empty slots are given


def test_held_evictions_free_their_slots_only_once_written_down():
    evicted = []
    slab, _ = make(4, on_evict=lambda blocks: evicted.extend(blocks), hold_evicted=True)
    keys = [bytes([65 + i]) * 16 for i in range(4)]
    put(slab, "ns", keys)
    # Full: this call pushes out its own shortfall plus the headroom, and hands out nothing yet.
    assert slab.allocate(1) == []
    assert [e.key for e in evicted] == keys[:2]   # least recently used first
    assert slab.contains("ns", keys) == [False, False, True, True]
    # The writer reads the held slots in place, intact, while others allocate.
    assert [bytes(slab.view(e.block.slot)) for e in evicted] == [keys[0] * 4, keys[1] * 4]
    assert slab.allocate(1) == []
    slab.release([evicted[0].block.slot])
    assert slab.allocate(1) == [evicted[0].block.slot]


def test_an_allocate_may_wait_for_a_write_down():
    evicted = []
    slab, _ = make(2, on_evict=lambda blocks: evicted.extend(blocks), hold_evicted=True)
    put(slab, "ns", [b"a" * 16, b"b" * 16])
    writer = threading.Timer(0.05, lambda: slab.release([e.block.slot for e in evicted]))
    writer.start()
    started = time.monotonic()
    slots = slab.allocate(1, wait_s=5.0)
    assert len(slots) == 1 and slots[0] in {e.block.slot for e in evicted}
    assert 0.04 < time.monotonic() - started < 2.0
    writer.join()
