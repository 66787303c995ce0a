"""Round trips through Redis and S3 in every order, promotion, write-down and TTL, with real services."""

import itertools
import time

import pytest
import redis

from fixtures_services import obj_tier, s3_client
from kvstore.store import LookupResult, TieredStore, TierUsage

NS = "5f3a9c"
KIB = 1024


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def payload(i: int, size: int = 64 * KIB) -> bytes:
    stamp = i.to_bytes(8, "big")
    return (stamp * (size // 8 + 1))[:size]


def tier_dicts(redis_url, s3_bucket, memory_bytes="16MiB", prefix="t"):
    endpoint, bucket = s3_bucket
    return {
        "memory": {"type": "memory", "bytes": memory_bytes},
        "redis": {"type": "redis", "url": redis_url, "key_prefix": f"{prefix}:"},
        "obj": obj_tier(endpoint, bucket, key_prefix=f"{prefix}/"),
    }


def metric(name: str, **labels) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("order", list(itertools.permutations(["memory", "redis", "obj"])))
def test_round_trip_every_order(order, redis_url, s3_bucket):
    tiers = tier_dicts(redis_url, s3_bucket, prefix="-".join(order))
    sizes = [1, 3 * KIB + 7, 256 * KIB]
    blocks = [(key(i), payload(i, size)) for i, size in enumerate(sizes)]
    with TieredStore([tiers[name] for name in order]) as store:
        assert store.put(NS, blocks, tiers=list(order)) == 3
        assert store.lookup(NS, [key(0), key(1), key(2), key(3)]) == LookupResult(3, [order[0]] * 3)
        assert store.get(NS, [key(2), key(9), key(0), key(1)]) == [blocks[2][1], None, blocks[0][1], blocks[1][1]]
        usage = store.stats()[NS]
        assert usage == {name: TierUsage(3, sum(sizes)) for name in order}
    # Each tier alone holds exact bytes (the memory tier died with its store).
    for name in order:
        if name != "memory":
            with TieredStore([tiers[name]]) as alone:
                assert alone.get(NS, [key(i) for i in range(3)]) == [value for _, value in blocks]
                assert alone.delete(NS, [key(0)]) == 1
                assert alone.clear(NS) == 2
                assert alone.get(NS, [key(1)]) == [None]


def test_promotion_on_hit(redis_url, s3_bucket):
    tiers = tier_dicts(redis_url, s3_bucket, prefix="promo")
    with TieredStore([tiers["memory"], tiers["redis"], tiers["obj"]]) as store:
        store.put(NS, [(key(i), payload(i)) for i in range(3)], tiers=["obj"])
        assert store.lookup(NS, [key(0), key(1), key(2)]).tiers == ["obj"] * 3
        before = metric("kvstore_tier_promotions_total", tier="memory")
        assert store.get(NS, [key(1)]) == [payload(1)]
        assert store.lookup(NS, [key(0), key(1), key(2)]).tiers == ["obj", "memory", "obj"]
        assert store.stats()[NS]["redis"] == TierUsage(1, 64 * KIB)
        assert metric("kvstore_tier_promotions_total", tier="memory") == before + 1
    with TieredStore([tiers["memory"], tiers["obj"]], promote_on_hit=False) as store:
        assert store.get(NS, [key(2)]) == [payload(2)]
        assert store.lookup(NS, [key(2)]).tiers == ["obj"]


def test_demotion_under_small_memory_budget(redis_url, s3_bucket):
    """Budget of 3 blocks: a 6-block chain keeps its head in memory and writes its tail down."""
    tiers = tier_dicts(redis_url, s3_bucket, memory_bytes=3 * 64 * KIB, prefix="demote")
    with TieredStore([tiers["memory"], tiers["redis"], tiers["obj"]]) as store:
        before = metric("kvstore_tier_demotions_total", tier="redis")
        assert store.put(NS, [(key(i), payload(i)) for i in range(6)]) == 6
        assert store.lookup(NS, [key(i) for i in range(6)]) == LookupResult(6, ["memory"] * 3 + ["redis"] * 3)
        assert metric("kvstore_tier_demotions_total", tier="redis") == before + 3
        assert "obj" not in store.stats()[NS]
        # Reading the tail promotes it; the head it pushes out is written down again.
        assert store.get(NS, [key(i) for i in range(6)]) == [payload(i) for i in range(6)]
        assert store.stats()[NS]["memory"] == TierUsage(3, 3 * 64 * KIB)
        assert store.stats()[NS]["redis"] == TierUsage(6, 6 * 64 * KIB)
        # Blocks already below are not written again.
        before = metric("kvstore_tier_demotions_total", tier="redis")
        store.put(NS, [(key(i), payload(i)) for i in range(10, 14)], tiers=["memory", "redis"])
        assert metric("kvstore_tier_demotions_total", tier="redis") == before


def test_ttl_expiry_in_redis_and_s3(redis_url, s3_bucket):
    tiers = tier_dicts(redis_url, s3_bucket, prefix="ttl")
    with TieredStore([tiers["redis"], tiers["obj"]]) as store:
        store.put(NS, [(key(1), payload(1))], tiers=["redis", "obj"], ttl_s=0.6)
        store.put(NS, [(key(2), payload(2))], tiers=["redis", "obj"])
        client = redis.Redis.from_url(redis_url)
        assert 0 < client.pttl(f"ttl:{NS}:{key(1).hex()}".encode()) <= 600
        assert 86_000_000 < client.pttl(f"ttl:{NS}:{key(2).hex()}".encode()) <= 86_400_000
        time.sleep(0.8)
        assert store.lookup(NS, [key(1)]) == LookupResult(0, [])
        assert store.get(NS, [key(1), key(2)]) == [None, payload(2)]
    # The expired S3 object was deleted when the get found it stale.
    endpoint, bucket = s3_bucket
    listed = s3_client(endpoint).list_objects_v2(Bucket=bucket, Prefix=f"ttl/{NS}/")["Contents"]
    assert [item["Key"] for item in listed] == [f"ttl/{NS}/{key(2).hex()}"]


def test_redis_evictions_are_misses(s3_bucket):
    from fixtures_services import start_redis

    url, stop, _ = start_redis(maxmemory="3mb")
    try:
        with TieredStore([{"type": "redis", "url": url}]) as store:
            for i in range(24):
                assert store.put(NS, [(key(i), payload(i, 256 * KIB))]) == 1
            got = store.get(NS, [key(i) for i in range(24)])
            evicted = [i for i, value in enumerate(got) if value is None]
            assert evicted, "Redis should have evicted some blocks under maxmemory 3mb"
            assert all(value == payload(i, 256 * KIB) for i, value in enumerate(got) if value is not None)
            assert store.lookup(NS, [key(i) for i in range(24)]).num_hits == evicted[0]
    finally:
        stop()


def test_redis_over_unix_socket():
    from fixtures_services import start_redis

    url, stop, _ = start_redis(unix_socket=True)
    try:
        with TieredStore([{"type": "redis", "url": url}]) as store:
            assert store.put(NS, [(key(1), payload(1))]) == 1
            assert store.get(NS, [key(1), key(2)]) == [payload(1), None]
            assert store.health() == {"redis": True}
    finally:
        stop()
