"""16 threads putting and getting overlapping keys through memory (small budget), Redis and S3."""

import random
import threading

from fixtures_services import obj_tier
from kvstore.store import TieredStore

NS = "feed01"
KEYS = 40
BLOCK = 32 * 1024


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def payload(i: int) -> bytes:
    stamp = i.to_bytes(8, "big")
    return (stamp * (BLOCK // 8 + 1))[:BLOCK]


def test_sixteen_threads_overlapping_keys(redis_url, s3_bucket):
    endpoint, bucket = s3_bucket
    tiers = [
        {"type": "memory", "bytes": 8 * BLOCK},  # far smaller than the key set: constant eviction
        {"type": "redis", "url": redis_url, "key_prefix": "conc:"},
        obj_tier(endpoint, bucket, max_inflight=8),
    ]
    problems: list[str] = []
    written: set[int] = set()
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(25):
            start = rng.randrange(KEYS - 4)
            ids = list(range(start, start + rng.randint(1, 4)))
            if rng.random() < 0.5:
                where = rng.choice([None, ["memory", "redis"], ["obj"], ["memory", "obj"]])
                if store.put(NS, [(key(i), payload(i)) for i in ids], tiers=where) != len(ids):
                    problems.append(f"put {ids} stored fewer blocks")
                with lock:
                    written.update(ids)
            else:
                for i, value in zip(ids, store.get(NS, [key(i) for i in ids])):
                    if value is not None and value != payload(i):
                        problems.append(f"key {i} returned another block's bytes")

    with TieredStore(tiers) as store:
        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads)
        assert problems == []
        ids = sorted(written)
        assert store.get(NS, [key(i) for i in ids]) == [payload(i) for i in ids]
        assert store.health() == {"memory": True, "redis": True, "obj": True}
