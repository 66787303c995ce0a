"""The Redis tier with `cluster: true` against a real 3-master Redis Cluster: every operation
across slots and nodes, exact bytes, and a TieredStore writing down to and promoting from it."""

import random
import time

from redis.cluster import RedisCluster

from kvstore.checksum import SealedBlock
from kvstore.config import parse_tiers
from kvstore.store import LookupResult, TieredStore, TierUsage
from kvstore.tiers.redis import RedisTier

MIB = 1 << 20


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def payload(i: int, size: int = MIB) -> bytes:
    return random.Random(i).randbytes(size)


def keys_per_node(url: str, prefix: str) -> dict[str, int]:
    client = RedisCluster.from_url(url)
    try:
        return {node.name: len(client.keys(f"{prefix}*", target_nodes=node)) for node in client.get_primaries()}
    finally:
        client.close()


def test_cluster_tier_round_trips_across_slots(redis_cluster):
    url, nodes = redis_cluster
    cfg = parse_tiers([{"type": "redis", "url": url, "cluster": True, "key_prefix": "ct:", "batch_connections": 3}])[0]
    tier = RedisTier(cfg)
    try:
        sizes = [MIB, 2 * MIB + 3, 1, MIB - 7] * 3
        blocks = [(key(i), SealedBlock.seal(payload(i, size), "tenant:a", key(i))) for i, size in enumerate(sizes)]
        other = [(key(i), SealedBlock.seal(payload(1000 + i, 64), "tenant", key(i))) for i in range(3)]
        tier.put("tenant:a", blocks)
        tier.put("tenant", other)
        spread = keys_per_node(url, "ct:tenant%3Aa:")
        assert sorted(spread) == sorted(nodes) and sum(spread.values()) == len(blocks)
        assert sum(count > 0 for count in spread.values()) >= 2, spread   # really across nodes

        asked = [key(99)] + [k for k, _ in blocks]
        got = tier.get("tenant:a", asked)
        assert got[0] is None
        for (k, block), back in zip(blocks, got[1:]):
            assert back.intact("tenant:a", k) and bytes(back.payload) == block.payload
        assert tier.contains("tenant:a", [key(0), key(99), key(11)]) == [True, False, True]
        assert tier.usage() == {"tenant:a": TierUsage(len(sizes), sum(sizes)), "tenant": TierUsage(3, 3 * 64)}
        assert tier.delete("tenant:a", [key(0), key(1), key(99)]) == 2
        # SCAN walks every primary; "tenant" (a prefix of "tenant:a" before escaping) keeps its blocks.
        assert tier.clear("tenant:a") == len(sizes) - 2
        assert sum(keys_per_node(url, "ct:tenant%3Aa:").values()) == 0
        assert [b.payload for b in tier.get("tenant", [k for k, _ in other])] == [b.payload for _, b in other]
        assert tier.clear("tenant") == 3
        tier.ping()
    finally:
        tier.close()


def test_tiered_store_over_a_cluster(redis_cluster):
    url, _ = redis_cluster
    tiers = [{"type": "memory", "bytes": 3 * MIB},
             {"type": "redis", "url": url, "cluster": True, "key_prefix": "cs:", "ttl_s": 600}]
    blocks = [(key(i), payload(i)) for i in range(8)]
    with TieredStore(tiers) as store:
        assert store.put("ns", blocks) == 8   # memory keeps 3; the rest are written down to the cluster
        assert store.lookup("ns", [k for k, _ in blocks]) == LookupResult(8, ["memory"] * 3 + ["redis"] * 5)
        assert store.get("ns", [k for k, _ in blocks]) == [value for _, value in blocks]
        assert store.stats()["ns"]["redis"] == TierUsage(8, 8 * MIB)
        assert store.health() == {"memory": True, "redis": True}
        assert store.clear("ns") == 8
    with TieredStore([tiers[1]]) as alone:
        assert alone.get("ns", [key(0), key(7)]) == [None, None]
        assert alone.put("ns", blocks[:4], ttl_s=30) == 4
        client = RedisCluster.from_url(url)
        try:
            assert 0 < client.pttl(f"cs:ns:{key(2).hex()}") <= 30_000
        finally:
            client.close()
        assert alone.get("ns", [k for k, _ in blocks[:4]]) == [value for _, value in blocks[:4]]
        assert alone.clear("ns") == 4


def test_cluster_down_at_start_is_an_outage_not_a_failed_store():
    from fixtures_services import free_port

    tier = {"type": "redis", "url": f"redis://127.0.0.1:{free_port()}", "cluster": True}
    with TieredStore([{"type": "memory", "bytes": MIB}, tier]) as store:
        assert store.put("ns", [(key(1), payload(1, 10))], tiers=["memory", "redis"]) == 1
        assert store.get("ns", [key(1), key(2)]) == [payload(1, 10), None]
        assert store.health() == {"memory": True, "redis": False}


def test_cluster_outage_then_recovery(own_redis_cluster):
    url, _, stop, restart = own_redis_cluster
    tiers = [{"type": "memory", "bytes": MIB}, {"type": "redis", "url": url, "cluster": True, "key_prefix": "co:"}]
    blocks = [(key(i), payload(i, 256 << 10)) for i in range(6)]
    with TieredStore(tiers) as store:
        assert store.put("ns", blocks, tiers=["redis"]) == 6
        stop()
        started = time.perf_counter()
        assert store.get("ns", [k for k, _ in blocks]) == [None] * 6
        assert time.perf_counter() - started < 1.5   # refused connects, not timeouts and retries
        assert store.health() == {"memory": True, "redis": False}
        restart()   # the same nodes and slot map, no keys
        deadline = time.monotonic() + 10
        while not store.health()["redis"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.put("ns", blocks, tiers=["redis"]) == 6
        assert store.get("ns", [k for k, _ in blocks]) == [value for _, value in blocks]
