"""Corruption written behind the store's back, and Redis / S3 outages with self-recovery."""

import time

import redis

from fixtures_services import make_bucket, obj_tier, s3_client, start_moto
from kvstore.checksum import HEADER_BYTES
from kvstore.store import LookupResult, TieredStore

NS = "c0ffee"
KIB = 1024


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def payload(i: int, size: int = 64 * KIB) -> bytes:
    stamp = i.to_bytes(8, "big")
    return (stamp * (size // 8 + 1))[:size]


def metric(name: str, **labels) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_redis_corruption_is_a_miss_and_deleted(redis_url):
    tier = {"type": "redis", "url": redis_url, "key_prefix": "corrupt:"}
    client = redis.Redis.from_url(redis_url)
    names = [f"corrupt:{NS}:{key(i).hex()}".encode() for i in range(4)]
    with TieredStore([tier]) as store:
        store.put(NS, [(key(i), payload(i)) for i in range(4)])
        before = metric("kvstore_tier_corrupt_total", tier="redis")
        client.setrange(names[0], HEADER_BYTES + 1000, b"\x00\xff")  # flipped payload bytes
        client.set(names[1], b"not a block")  # header unreadable
        client.append(names[2], b"tail")  # longer than the header says
        assert store.get(NS, [key(i) for i in range(4)]) == [None, None, None, payload(3)]
        assert [client.exists(name) for name in names] == [0, 0, 0, 1]
        assert metric("kvstore_tier_corrupt_total", tier="redis") == before + 3


def test_s3_corruption_is_a_miss_and_deleted(s3_bucket):
    endpoint, bucket = s3_bucket
    s3 = s3_client(endpoint)
    with TieredStore([obj_tier(endpoint, bucket)]) as store:
        store.put(NS, [(key(i), payload(i)) for i in range(2)])
        name = f"tierkv/{NS}/{key(0).hex()}"
        frame = bytearray(s3.get_object(Bucket=bucket, Key=name)["Body"].read())
        frame[-1] ^= 0x01
        s3.put_object(Bucket=bucket, Key=name, Body=bytes(frame))
        assert store.get(NS, [key(0), key(1)]) == [None, payload(1)]
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"tierkv/{NS}/")["Contents"]
        assert [item["Key"] for item in listed] == [f"tierkv/{NS}/{key(1).hex()}"]


def test_bad_copy_is_replaced_from_a_good_one_below(redis_url, s3_bucket):
    endpoint, bucket = s3_bucket
    tiers = [{"type": "redis", "url": redis_url, "key_prefix": "repair:"}, obj_tier(endpoint, bucket)]
    client = redis.Redis.from_url(redis_url)
    name = f"repair:{NS}:{key(5).hex()}".encode()
    with TieredStore(tiers) as store:
        store.put(NS, [(key(5), payload(5))], tiers=["redis", "obj"])
        client.setrange(name, HEADER_BYTES, b"XX")
        assert store.get(NS, [key(5)]) == [payload(5)]
        # The good S3 copy was promoted over the deleted bad one.
        assert client.get(name)[HEADER_BYTES:] == payload(5)


def test_redis_outage_serves_from_memory_and_s3_then_recovers(own_redis, s3_bucket):
    url, stop, restart = own_redis
    endpoint, bucket = s3_bucket
    tiers = [{"type": "memory", "bytes": "1MiB"}, {"type": "redis", "url": url}, obj_tier(endpoint, bucket)]
    with TieredStore(tiers) as store:
        store.put(NS, [(key(0), payload(0))], tiers=["memory", "redis"])
        store.put(NS, [(key(1), payload(1))], tiers=["obj"])
        store.put(NS, [(key(2), payload(2))], tiers=["redis"])
        errors_before = metric("kvstore_tier_errors_total", tier="redis", op="get")
        stop()
        started = time.perf_counter()
        assert store.get(NS, [key(0), key(1), key(2)]) == [payload(0), payload(1), None]
        assert time.perf_counter() - started < 1.5  # a refused connect, not timeouts and retries
        assert metric("kvstore_tier_errors_total", tier="redis", op="get") == errors_before + 1
        assert store.health() == {"memory": True, "redis": False, "obj": True}
        assert metric("kvstore_tier_up", tier="redis") == 0
        assert store.put(NS, [(key(3), payload(3))], tiers=["redis", "obj"]) == 1
        assert store.lookup(NS, [key(0), key(1), key(3)]) == LookupResult(3, ["memory", "memory", "obj"])
        restart()  # comes back empty
        assert wait_for(lambda: store.put(NS, [(key(4), payload(4))], tiers=["redis"]) == 1
                        and store.lookup(NS, [key(4)]).tiers == ["redis"])
        assert store.health() == {"memory": True, "redis": True, "obj": True}
        assert metric("kvstore_tier_up", tier="redis") == 1
        assert store.get(NS, [key(4)]) == [payload(4)]


def test_s3_outage_then_new_server_on_same_port_recovers():
    endpoint, stop = start_moto()
    make_bucket(endpoint, "outage")
    tiers = [{"type": "memory", "bytes": "1MiB"}, obj_tier(endpoint, "outage")]
    with TieredStore(tiers) as store:
        store.put(NS, [(key(0), payload(0))], tiers=["memory", "obj"])
        store.put(NS, [(key(1), payload(1))], tiers=["obj"])
        stop()
        assert store.get(NS, [key(0), key(1)]) == [payload(0), None]
        assert store.health() == {"memory": True, "obj": False}
        assert metric("kvstore_tier_errors_total", tier="obj", op="get") >= 1
        port = int(endpoint.rsplit(":", 1)[1])
        _, stop = start_moto(port)
        try:
            assert wait_for(lambda: store.health()["obj"])
            store.put(NS, [(key(2), payload(2))], tiers=["obj"])
            assert store.get(NS, [key(1), key(2)]) == [payload(1), payload(2)]
        finally:
            stop()
