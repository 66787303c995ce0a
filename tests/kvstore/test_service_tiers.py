"""A tier outage seen through the daemon: it keeps serving from the other tiers, reports the tier down
(Stats, the health service, /metrics), and reports it up again once Redis is back."""

import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fixtures_services import free_port, obj_tier
from kvstore.server import tier_service_name
from kvstore.store import LookupResult, TieredStore
from service_daemon import NS, daemon_and_client, key, payload

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _wait_for(condition, what: str, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _tier_status(port: int, tier: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=tier_service_name(tier)), timeout=5).status


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_redis_outage_daemon_serves_from_other_tiers_and_recovers(own_redis, s3_bucket):
    redis_url, stop_redis, restart_redis = own_redis
    endpoint, bucket = s3_bucket
    redis_tier = {"type": "redis", "url": redis_url, "key_prefix": "outage:"}
    tiers = [{"type": "memory", "bytes": "64MiB"}, redis_tier, obj_tier(endpoint, bucket)]
    metrics_port = free_port()
    with daemon_and_client(tiers, metrics_port=metrics_port) as (handle, client):
        first = [(key(i), payload(i, 300_000)) for i in range(3)]
        assert client.put(NS, first, tiers=["memory", "redis", "obj"]) == 3
        assert _tier_status(handle.port, "redis") == SERVING

        stop_redis()
        assert client.get(NS, [k for k, _ in first]) == [p for _, p in first]
        second = [(key(i), payload(i, 2 << 20)) for i in range(10, 13)]
        assert client.put(NS, second, tiers=["redis", "obj"]) == 3
        assert client.lookup(NS, [k for k, _ in second]) == LookupResult(3, ["obj"] * 3)
        assert client.get(NS, [k for k, _ in second]) == [p for _, p in second]
        assert client.health() == {"memory": True, "redis": False, "obj": True}
        _wait_for(lambda: _tier_status(handle.port, "redis") == NOT_SERVING, "redis NOT_SERVING in health")
        assert _tier_status(handle.port, "obj") == SERVING
        text = _metrics(metrics_port)
        assert 'kvstore_tier_up{tier="redis"} 0.0' in text
        assert 'kvstore_rpcs_total{code="OK",method="Get"}' in text
        assert 'kvstore_rpc_duration_seconds_bucket{le="0.005",method="Put"}' in text

        restart_redis()
        _wait_for(lambda: client.health()["redis"], "redis back up in Stats")
        _wait_for(lambda: _tier_status(handle.port, "redis") == SERVING, "redis SERVING in health")
        third = [(key(20), payload(20, 1 << 20))]
        assert client.put(NS, third, tiers=["redis"]) == 1
    with TieredStore([redis_tier]) as redis_only:
        assert redis_only.get(NS, [key(20)]) == [third[0][1]]
