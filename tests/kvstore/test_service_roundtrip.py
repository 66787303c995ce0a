"""Blocks through the daemon over loopback gRPC: exact bytes, lookup, delete, clear, stats, async client."""

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.client import AsyncKVStoreClient, KVStoreClient
from kvstore.server import SERVICE_NAME, tier_service_name
from kvstore.store import LookupResult, TierUsage
from service_daemon import NS, daemon_and_client, key, payload, running_daemon

# Edge sizes around the 1 MiB chunk, and the largest block the engine uses.
SIZES = [0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 5, 8 << 20]


def test_blocks_round_trip_exactly_up_to_8_mib():
    with daemon_and_client() as (_, client):
        blocks = [(key(i), payload(i, size)) for i, size in enumerate(SIZES)]
        assert client.put(NS, blocks) == len(SIZES)
        keys = [k for k, _ in blocks]
        assert client.get(NS, keys + [key(99)]) == [p for _, p in blocks] + [None]
        assert client.get(NS, [key(99), key(6), key(99), key(0)]) == [None, blocks[6][1], None, b""]


def test_lookup_counts_leading_hits_with_their_tier():
    with daemon_and_client() as (_, client):
        client.put(NS, [(key(i), payload(i, 1000)) for i in (0, 1, 3)])
        assert client.lookup(NS, [key(0), key(1), key(2), key(3)]) == LookupResult(2, ["memory", "memory"])
        assert client.lookup(NS, [key(2), key(0)]) == LookupResult(0, [])
        assert client.lookup("other-ns", [key(0)]) == LookupResult(0, [])


def test_put_is_idempotent_and_delete_clear_stats_work():
    with daemon_and_client() as (_, client):
        blocks = [(key(i), payload(i, 4096)) for i in range(5)]
        assert client.put(NS, blocks) == 5
        assert client.put(NS, blocks) == 5
        client.put("ns-b", [(key(0), payload(7, 100))])
        assert client.stats() == {NS: {"memory": TierUsage(5, 5 * 4096)}, "ns-b": {"memory": TierUsage(1, 100)}}
        assert client.delete(NS, [key(0), key(42)]) == 1
        assert client.get(NS, [key(0), key(1)]) == [None, blocks[1][1]]
        assert client.clear(NS) == 4
        assert client.get(NS, [key(1)]) == [None]
        assert client.stats() == {"ns-b": {"memory": TierUsage(1, 100)}}
        assert client.health() == {"memory": True}


def test_put_ttl_expires_blocks():
    with daemon_and_client() as (_, client):
        client.put(NS, [(key(1), payload(1, 10))], ttl_s=0.2)
        client.put(NS, [(key(2), payload(2, 10))])
        assert client.get(NS, [key(1), key(2)]) == [payload(1, 10), payload(2, 10)]
        time.sleep(0.4)
        assert client.get(NS, [key(1), key(2)]) == [None, payload(2, 10)]


def test_many_blocks_in_one_put_beyond_the_flush_batch():
    # 80 MiB in one Put crosses the daemon's 64 MiB flush batch.
    with daemon_and_client(tiers=[{"type": "memory", "bytes": "128MiB"}]) as (_, client):
        blocks = [(key(i), payload(i, 4 << 20)) for i in range(20)]
        assert client.put(NS, blocks) == 20
        got = client.get(NS, [k for k, _ in blocks])
        assert [g == p for g, (_, p) in zip(got, blocks)] == [True] * 20


def test_health_service_reports_serving_per_tier():
    with running_daemon() as (handle, url), grpc.insecure_channel(url.removeprefix("grpc://")) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME, tier_service_name("memory")):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_async_client_round_trip():
    async def scenario(url: str):
        async with AsyncKVStoreClient(url, timeout_s=20) as client:
            blocks = [(key(i), payload(i, size)) for i, size in enumerate([5, 2 << 20, 8 << 20])]
            assert await client.put(NS, blocks, tiers=["memory"]) == 3
            results = await asyncio.gather(*(client.get(NS, [k]) for k, _ in blocks))
            assert results == [[p] for _, p in blocks]
            assert await client.lookup(NS, [key(0), key(1), key(5)]) == LookupResult(2, ["memory", "memory"])
            assert await client.delete(NS, [key(0)]) == 1
            assert await client.clear(NS) == 2
            assert await client.health() == {"memory": True}

    with running_daemon() as (_, url):
        asyncio.run(scenario(url))


def test_client_rejects_bad_urls():
    for url in ("http://127.0.0.1:1", "grpc://127.0.0.1", "127.0.0.1:5"):
        with pytest.raises(ValueError, match="grpc://host:port"):
            KVStoreClient(url)
