"""Namespaces are isolated by construction in every tier: `clear("tenant")` removes `tenant` and
nothing of `tenant:b` (a Redis SCAN pattern or S3 prefix built from the raw name matched both)."""

import uuid

from fixtures_services import obj_tier
from kvstore.client import KVStoreClient
from kvstore.store import TieredStore, TierUsage
from service_daemon import key, payload, running_daemon

# Namespaces that `tenant` is a prefix of, with the separators and glob characters of both stores.
NAMESPACES = ["tenant", "tenant:b", "tenant:", "tenant*", "tenant/x", "tenant%3Ab", "tenant.b"]


def _remote_tiers(redis_url: str, s3_bucket: tuple[str, str]) -> dict[str, dict]:
    tag = uuid.uuid4().hex[:8]
    return {"redis": {"type": "redis", "url": redis_url, "key_prefix": f"ns-{tag}:"},
            "obj": obj_tier(*s3_bucket, key_prefix=f"ns-{tag}/")}


def _held(stats: dict) -> dict[str, dict[str, int]]:
    return {ns: {tier: usage.blocks for tier, usage in tiers.items()} for ns, tiers in stats.items()}


def test_clear_removes_exactly_one_namespace_in_every_tier(redis_url, s3_bucket):
    remote = _remote_tiers(redis_url, s3_bucket)
    with TieredStore([{"type": "memory", "bytes": "4MiB"}, *remote.values()]) as store:
        for i, namespace in enumerate(NAMESPACES):
            store.put(namespace, [(key(1), payload(i, 1000)), (key(2), payload(i, 1000))],
                      tiers=["memory", "redis", "obj"])
        assert _held(store.stats()) == {ns: {"memory": 2, "redis": 2, "obj": 2} for ns in NAMESPACES}
        assert store.clear("tenant") == 2
        assert _held(store.stats()) == {ns: {"memory": 2, "redis": 2, "obj": 2} for ns in NAMESPACES[1:]}
        assert store.get("tenant", [key(1), key(2)]) == [None, None]
    for tier, config in remote.items():   # each remote tier on its own still serves the other namespaces
        with TieredStore([config]) as store:
            for i, namespace in enumerate(NAMESPACES[1:], start=1):
                assert store.get(namespace, [key(1), key(2)]) == [payload(i, 1000)] * 2, (tier, namespace)


def test_clear_through_the_daemon(redis_url, s3_bucket):
    namespaces = [ns for ns in NAMESPACES if "*" not in ns and "/" not in ns and "%" not in ns]  # the daemon's set
    with running_daemon(list(_remote_tiers(redis_url, s3_bucket).values())) as (_, url), KVStoreClient(url) as client:
        for i, namespace in enumerate(namespaces):
            assert client.put(namespace, [(key(1), payload(i, 100))], tiers=["redis", "obj"]) == 1
        assert client.clear("tenant") == 1
        usage = {"redis": TierUsage(1, 100), "obj": TierUsage(1, 100)}
        assert client.stats() == {namespace: usage for namespace in namespaces[1:]}
        for i, namespace in enumerate(namespaces[1:], start=1):
            assert client.get(namespace, [key(1)]) == [payload(i, 100)]
        assert client.get("tenant", [key(1)]) == [None]
