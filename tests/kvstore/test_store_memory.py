"""The memory tier through TieredStore: round trips, budget eviction order, TTL, copy-light reads."""

import time

import pytest

from kvstore.store import LookupResult, TieredStore, TierUsage

NS = "ns0"


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def payload(i: int, size: int = 64 * 1024) -> bytes:
    return bytes([i % 251]) * (size - 4) + i.to_bytes(4, "big")


def test_round_trip_and_lookup():
    with TieredStore([{"type": "memory", "bytes": "4MiB"}]) as store:
        assert store.put(NS, [(key(i), payload(i)) for i in range(4)]) == 4
        assert store.get(NS, [key(i) for i in range(5)]) == [payload(i) for i in range(4)] + [None]
        assert store.lookup(NS, [key(0), key(1), key(9), key(2)]) == LookupResult(2, ["memory", "memory"])
        assert store.lookup("other", [key(0)]) == LookupResult(0, [])
        assert store.stats() == {NS: {"memory": TierUsage(4, 4 * 64 * 1024)}}
        assert store.delete(NS, [key(0), key(7)]) == 1
        assert store.get(NS, [key(0)]) == [None]
        assert store.clear(NS) == 3
        assert store.stats() == {}
        assert store.health() == {"memory": True}


def test_get_returns_the_stored_object_and_copies_mutable_input():
    with TieredStore([{"type": "memory", "bytes": "1MiB"}]) as store:
        data = payload(1)
        store.put(NS, [(key(1), data)])
        assert store.get(NS, [key(1)])[0] is data
        buffer = bytearray(payload(2))
        store.put(NS, [(key(2), memoryview(buffer))])
        buffer[0] ^= 0xFF
        assert store.get(NS, [key(2)]) == [payload(2)]


def test_eviction_keeps_chain_heads():
    """A budget of 4 blocks, a chain of 6: the tail goes first, the head survives."""
    with TieredStore([{"type": "memory", "bytes": 4 * 64 * 1024}]) as store:
        store.put(NS, [(key(i), payload(i)) for i in range(6)])
        assert store.lookup(NS, [key(i) for i in range(6)]) == LookupResult(4, ["memory"] * 4)
        store.put(NS, [(key(10), payload(10))])
        # Least recently used of the chain is its tail block 3.
        assert store.get(NS, [key(i) for i in (0, 1, 2, 3, 10)]) == [payload(0), payload(1), payload(2), None, payload(10)]


def test_block_larger_than_budget_is_not_kept():
    with TieredStore([{"type": "memory", "bytes": 1000}]) as store:
        assert store.put(NS, [(key(1), payload(1))]) == 1
        assert store.get(NS, [key(1)]) == [None]


def test_ttl_expiry():
    with TieredStore([{"type": "memory", "bytes": "1MiB", "ttl_s": 0.3}]) as store:
        store.put(NS, [(key(1), payload(1))], ttl_s=0.1)
        store.put(NS, [(key(2), payload(2))])
        assert store.get(NS, [key(1), key(2)]) == [payload(1), payload(2)]
        time.sleep(0.15)
        assert store.get(NS, [key(1), key(2)]) == [None, payload(2)]
        time.sleep(0.2)
        assert store.lookup(NS, [key(2)]).num_hits == 0


def test_put_argument_errors():
    with TieredStore([{"type": "memory", "bytes": "1MiB"}]) as store:
        with pytest.raises(ValueError, match=r"unknown tier name\(s\) \['redis'\]"):
            store.put(NS, [(key(1), b"x")], tiers=["redis"])
        with pytest.raises(ValueError, match="ttl_s"):
            store.put(NS, [(key(1), b"x")], ttl_s=0)
        assert store.put(NS, []) == 0
