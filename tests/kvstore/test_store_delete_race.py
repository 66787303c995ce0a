"""A Delete that races a Get promoting the same key wins: once both return, the key is in no tier
(the Get read the block from Redis before the Delete and copied it up after)."""

import threading

from kvstore.store import TieredStore

NS = "race"
TRIES = 150
KEYS = 8


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_delete_racing_a_promoting_get_leaves_the_key_absent(redis_url):
    tiers = [{"type": "memory", "bytes": "64MiB"}, {"type": "redis", "url": redis_url, "key_prefix": "delrace:"}]
    keys = [key(i) for i in range(KEYS)]
    with TieredStore(tiers) as store:
        memory, redis = store.tier("memory"), store.tier("redis")
        back = 0
        for _ in range(TRIES):
            store.put(NS, [(k, b"v" * 4096) for k in keys], tiers=["redis"])
            start = threading.Barrier(2)

            def get():
                start.wait()
                store.get(NS, keys)

            def delete():
                start.wait()
                for k in keys:   # one key at a time: more interleavings with the Get's promotion
                    store.delete(NS, [k])

            threads = [threading.Thread(target=get), threading.Thread(target=delete)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            back += sum(memory.contains(NS, keys)) + sum(redis.contains(NS, keys))
            store.delete(NS, keys)
        assert back == 0, f"{back} deleted keys came back in {TRIES} tries"
