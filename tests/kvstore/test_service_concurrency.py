"""At least 16 clients putting and getting overlapping keys at once: nothing lost, nothing mixed up."""

import random
import threading

import pytest

from kvstore.client import KVStoreClient
from kvstore.store import TieredStore
from service_daemon import NS, key, payload, running_daemon

CLIENTS = 16
KEYS = 48
ROUNDS = 6


def _size(i: int) -> int:
    # 64 KiB .. 1.5 MiB: single- and multi-chunk blocks interleave in the daemon.
    return (64 << 10) * (1 + i % 24)


def _client_work(url: str, seed: int, mine: set[int], errors: list[str]) -> None:
    rng = random.Random(seed)
    with KVStoreClient(url, timeout_s=60) as client:
        for _ in range(ROUNDS):
            batch = rng.sample(range(KEYS), 4)
            client.put(NS, [(key(i), payload(i, _size(i))) for i in batch], tiers=["memory", "redis"])
            mine.update(batch)
            asked = rng.sample(range(KEYS), 6)
            for i, got in zip(asked, client.get(NS, [key(i) for i in asked])):
                if got is None and i in mine:
                    errors.append(f"client {seed}: block {i} it had put is missing")
                elif got is not None and got != payload(i, _size(i)):
                    errors.append(f"client {seed}: block {i} came back with wrong bytes")


@pytest.mark.slow
def test_16_concurrent_clients_overlapping_keys(redis_url):
    tiers = [{"type": "memory", "bytes": "512MiB"}, {"type": "redis", "url": redis_url, "key_prefix": "conc:"}]
    with running_daemon(tiers) as (_, url):
        puts: list[set[int]] = [set() for _ in range(CLIENTS)]
        errors: list[str] = []
        threads = [threading.Thread(target=_client_work, args=(url, n, puts[n], errors)) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []
        written = sorted(set().union(*puts))
        with KVStoreClient(url) as client:
            assert client.get(NS, [key(i) for i in written]) == [payload(i, _size(i)) for i in written]
            assert client.lookup(NS, [key(i) for i in written]).num_hits == len(written)
        # Every block was also written through to Redis: a store on that Redis alone has them all.
        with TieredStore([tiers[1]]) as redis_only:
            assert redis_only.get(NS, [key(i) for i in written]) == [payload(i, _size(i)) for i in written]
