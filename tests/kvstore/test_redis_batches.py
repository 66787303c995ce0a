"""The Redis tier's parallel batches against a real redis-server: exact bytes of MiB-sized blocks
through several pipelines at once, the value each SET leaves in Redis, and Redis stopping with a
batch in flight (misses and TierError, promptly, never wrong bytes or a hang)."""

import random
import threading
import time

import pytest
import redis

from kvstore.checksum import SealedBlock
from kvstore.config import parse_tiers
from kvstore.store import LookupResult, TieredStore
from kvstore.tiers.base import TierError
from kvstore.tiers.redis import RedisTier

NS = "batch:ns"   # a ':' in the namespace: escaped in the key names
MIB = 1 << 20


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def payload(i: int, size: int) -> bytes:
    return random.Random(i).randbytes(size)


def metric(name: str, **labels) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def get_connections(url: str) -> int:
    """Client connections whose last command was a GET (the control connection's is CLIENT LIST)."""
    return sum(client["cmd"] == "get" for client in redis.Redis.from_url(url).client_list())


@pytest.mark.parametrize("connections", [1, 3, 4])
def test_batches_of_mib_blocks_round_trip_exact_bytes(own_redis, connections):
    url, _, _ = own_redis
    # Uneven sizes, so the runs a put is cut into (balanced by bytes) hold different block counts.
    sizes = [MIB, 3 * MIB + 17, 1, MIB - 1, 64 << 10, 2 * MIB, MIB + 4099, 5]
    blocks = [(key(i), payload(i, size)) for i, size in enumerate(sizes)]
    tier = {"type": "redis", "url": url, "key_prefix": "par:", "batch_connections": connections}
    with TieredStore([tier]) as store:
        assert store.put(NS, blocks) == len(blocks)
        asked = [key(100), *(key(i) for i in reversed(range(len(sizes)))), key(101)]
        # Redis holds every command for 0.3 s, so each pipeline of the get is in flight at once and
        # needs a connection of its own: as many connections end on a GET as the batch was cut into.
        redis.Redis.from_url(url).client_pause(300, all=True)
        assert store.get(NS, asked) == [None, *(value for _, value in reversed(blocks)), None]
        assert get_connections(url) == connections
        assert store.lookup(NS, [key(i) for i in range(len(sizes))] + [key(102)]) == LookupResult(
            len(sizes), ["redis"] * len(sizes))
        assert store.stats()[NS]["redis"].bytes == sum(sizes)
        assert store.delete(NS, [key(0), key(100)]) == 1
        assert store.clear(NS) == len(sizes) - 1
        assert store.get(NS, [key(i) for i in range(len(sizes))]) == [None] * len(sizes)


def test_stored_value_is_the_frame_with_its_ttl(own_redis):
    """Header and payload go out as two buffers of one SET: Redis holds exactly `header || payload`."""
    url, _, _ = own_redis
    client = redis.Redis.from_url(url)
    cfg = parse_tiers([{"type": "redis", "url": url, "key_prefix": "frame:", "ttl_s": 60}])[0]
    tier = RedisTier(cfg)
    try:
        blocks = [(key(i), SealedBlock.seal(payload(i, MIB + i), NS, key(i), time.time() + 30)) for i in range(4)]
        tier.put(NS, blocks)
        for k, block in blocks:
            name = f"frame:batch%3Ans:{k.hex()}".encode()
            assert client.get(name) == block.frame()
            assert 25_000 < client.pttl(name) <= 30_000   # the block's expiry, earlier than the tier's
        for (k, block), got in zip(blocks, tier.get(NS, [k for k, _ in blocks])):
            assert got.intact(NS, k) and got.payload == block.payload and got.expires_at == block.expires_at
    finally:
        tier.close()


def test_redis_stopped_with_a_batch_in_flight(own_redis):
    """Every pipeline of a get is waiting for its replies when Redis goes away: the tier raises
    TierError (no wrong bytes, no hang), and the store turns that into misses and an outage."""
    url, stop, restart = own_redis
    control = redis.Redis.from_url(url)
    tier_dict = {"type": "redis", "url": url, "key_prefix": "stop:", "batch_connections": 4}
    blocks = [(key(i), payload(i, MIB)) for i in range(12)]
    keys = [k for k, _ in blocks]

    def stop_while_paused(action):
        """Run `action` in a thread while Redis holds every command, stop Redis, and return what
        `action` returned or raised and how long it took."""
        outcome = {}

        def run():
            started = time.perf_counter()
            try:
                outcome["value"] = action()
            except Exception as error:  # noqa: BLE001 - the outcome under test
                outcome["error"] = error
            outcome["seconds"] = time.perf_counter() - started

        control.client_pause(5000, all=True)
        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(0.3)   # the batch's pipelines are sent and waiting
        assert thread.is_alive()
        stop()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the batch hung after Redis stopped"
        return outcome

    tier = RedisTier(parse_tiers([tier_dict])[0])
    try:
        tier.put(NS, [(k, SealedBlock.seal(v, NS, k)) for k, v in blocks])
        outcome = stop_while_paused(lambda: tier.get(NS, keys))
        assert isinstance(outcome.get("error"), TierError), outcome
        assert outcome["seconds"] < 3
        started = time.perf_counter()
        with pytest.raises(TierError):
            tier.put(NS, [(k, SealedBlock.seal(v, NS, k)) for k, v in blocks])
        assert time.perf_counter() - started < 1
    finally:
        tier.close()

    restart()
    with TieredStore([tier_dict]) as store:
        assert store.put(NS, blocks) == len(blocks)
        before = metric("kvstore_tier_errors_total", tier="redis", op="get")
        outcome = stop_while_paused(lambda: store.get(NS, keys))
        assert outcome.get("value") == [None] * len(keys) and outcome["seconds"] < 3
        assert metric("kvstore_tier_errors_total", tier="redis", op="get") == before + 1
        assert metric("kvstore_tier_up", tier="redis") == 0
        assert store.put(NS, blocks) == 0   # skipped while down
        restart()   # comes back empty: misses, and the tier is up again once the backoff allows a probe
        deadline = time.monotonic() + 5
        while store.put(NS, blocks[:2]) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.get(NS, keys[:3]) == [blocks[0][1], blocks[1][1], None]
