"""TTLs are finite, positive and at most 10 years, at every edge: a TTL no tier can hold once made
every Redis SET fail, which marked Redis down for every client of the daemon."""

import math
import uuid

import grpc
import pytest

from kvstore.client import KVStoreClient, KVStoreError, RetryPolicy
from kvstore.config import ConfigError, parse_tiers
from kvstore.slab_client import SlabClient
from kvstore.store import TieredStore
from service_daemon import NS, key, running_daemon

TEN_YEARS = 10 * 365 * 86400.0
BAD_TTLS = [math.inf, -math.inf, math.nan, 1e300, TEN_YEARS + 1, 0.0, -1.0]
MESSAGE = "ttl_s: must be a positive number of seconds, at most 315360000 (10 years)"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _redis_tier(redis_url: str) -> dict:
    return {"type": "redis", "url": redis_url, "key_prefix": f"ttl-{uuid.uuid4().hex[:8]}:"}


@pytest.mark.parametrize("ttl_s", BAD_TTLS)
def test_store_put_refuses_the_ttl_and_redis_stays_up(redis_url, ttl_s):
    with TieredStore([_redis_tier(redis_url)]) as store:
        with pytest.raises(ValueError) as info:
            store.put(NS, [(key(1), b"v")], ttl_s=ttl_s)
        assert str(info.value) == MESSAGE
        assert store.health() == {"redis": True}
        assert store.put(NS, [(key(1), b"v")], ttl_s=TEN_YEARS) == 1
        assert store.get(NS, [key(1)]) == [b"v"]


@pytest.mark.parametrize("ttl_s", BAD_TTLS)
def test_daemon_put_and_commit_slots_refuse_the_ttl_and_redis_stays_up(redis_url, ttl_s, no_shm_leftovers):
    slab = {"type": "memory", "bytes": 1 << 20, "slot_bytes": 1 << 16}
    with running_daemon([slab, _redis_tier(redis_url)]) as (_, url), \
            KVStoreClient(url, retry=RetryPolicy(attempts=1)) as client, SlabClient(url) as slab_client:
        with pytest.raises(KVStoreError) as info:
            client.put(NS, [(key(1), b"v")], tiers=["redis"], ttl_s=ttl_s)
        assert (info.value.method, info.value.code, info.value.details) == ("Put", INVALID, MESSAGE)
        with pytest.raises(KVStoreError) as info:
            slab_client.commit(NS, [key(1)], slab_client.allocate(1), [0], [None], tiers=["redis"], ttl_s=ttl_s)
        assert (info.value.method, info.value.code, info.value.details) == ("CommitSlots", INVALID, MESSAGE)
        assert client.health() == {"memory": True, "redis": True}
        assert client.put(NS, [(key(1), b"v")], tiers=["redis"], ttl_s=TEN_YEARS) == 1
        assert client.get(NS, [key(1)]) == [b"v"]


@pytest.mark.parametrize("tier_type", ["memory", "redis", "obj"])
def test_a_tiers_own_ttl_is_bounded_too(tier_type):
    tier = {"memory": {"type": "memory"}, "redis": {"type": "redis"}, "obj": {"type": "obj", "bucket": "bkt"}}[tier_type]
    for ttl_s in (math.inf, math.nan, TEN_YEARS + 1, 0):
        with pytest.raises(ConfigError, match=r"ttl_s"):
            parse_tiers([{**tier, "ttl_s": ttl_s}])
    assert parse_tiers([{**tier, "ttl_s": TEN_YEARS}])[0].ttl_s == TEN_YEARS
