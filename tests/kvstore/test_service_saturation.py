"""A daemon whose calls are saturated still answers: stalled Put streams and oversized Lookups take
neither every RPC thread nor the memory, the health service and a normal Get answer within a second,
and stalled streams are cut after stream_idle_timeout_s."""

import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.client import KVStoreClient
from kvstore.config import parse_store_config
from kvstore.limits import Limits
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.server import serve
from kvstore.streaming import CHUNK_BYTES
from service_daemon import NS, key, payload

IDLE_S = 2.0
STALLED = 64
OVERSIZED = 8


def _stalled_put(release: threading.Event):
    yield pb.PutRequest(header=pb.PutHeader(namespace=NS))
    release.wait()


def _answers_quickly(check) -> float:
    start = time.monotonic()
    check()
    return time.monotonic() - start


def test_stalled_streams_and_oversized_lookups_leave_health_and_get_answering():
    cfg = parse_store_config({"listen": "127.0.0.1:0", "tiers": [{"type": "memory", "bytes": "64MiB"}],
                              "max_concurrent_rpcs": 64, "stream_idle_timeout_s": IDLE_S})
    handle = serve(cfg)
    address = f"127.0.0.1:{handle.port}"
    release = threading.Event()
    channels = [grpc.insecure_channel(address) for _ in range(4)]
    try:
        with KVStoreClient(f"grpc://{address}", timeout_s=5) as client:
            assert client.put(NS, [(key(1), payload(1, 4096))]) == 1
            stubs = [pb_grpc.KVStoreStub(channel) for channel in channels]
            started = time.monotonic()
            stalled = [stubs[i % 4].Put.future(_stalled_put(release)) for i in range(STALLED)]
            huge = pb.LookupRequest(namespace=NS, keys=[key(i % 997) for i in range(1_000_000)])
            oversized = [stubs[i % 4].Lookup.future(huge, timeout=30) for i in range(OVERSIZED)]
            time.sleep(0.5)

            health = health_pb2_grpc.HealthStub(channels[0])
            for _ in range(5):
                check = lambda: health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)  # noqa: E731
                assert _answers_quickly(check) < 1.0
                assert _answers_quickly(lambda: client.get(NS, [key(1)]) == [payload(1, 4096)]) < 1.0
                time.sleep(0.1)

            # 18 MB: gRPC refuses it before holding it whole (over any message the daemon receives).
            limit = Limits().receive_bytes(CHUNK_BYTES)
            for call in oversized:
                error = call.exception(timeout=30)
                assert (error.code(), error.details()) == (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"SERVER: Received message larger than max ({huge.ByteSize()} vs. {limit})")

            codes = {}
            for call in stalled:
                error = call.exception(timeout=IDLE_S + 10)
                assert error is not None, "a stalled Put stream completed"
                codes[error.code()] = codes.get(error.code(), 0) + 1
            elapsed = time.monotonic() - started
            # Half the calls may be Put streams: those wait out the idle timeout, the rest are refused.
            assert codes.get(grpc.StatusCode.RESOURCE_EXHAUSTED) == STALLED // 2
            cut = codes.get(grpc.StatusCode.CANCELLED, 0) + codes.get(grpc.StatusCode.DEADLINE_EXCEEDED, 0)
            assert cut == STALLED // 2, codes
            assert IDLE_S <= elapsed < IDLE_S + 5

            # Their threads and slots came back: Puts are admitted again.
            assert client.put(NS, [(key(2), payload(2, 4096))]) == 1
            assert client.get(NS, [key(2)]) == [payload(2, 4096)]
    finally:
        release.set()
        for channel in channels:
            channel.close()
        handle.stop(grace_s=0.5)


def test_calls_beyond_max_concurrent_rpcs_are_refused_at_once():
    cfg = parse_store_config({"listen": "127.0.0.1:0", "max_concurrent_rpcs": 4, "stream_idle_timeout_s": 30})
    handle = serve(cfg)
    release = threading.Event()
    channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    try:
        stub = pb_grpc.KVStoreStub(channel)
        held = [stub.Put.future(_stalled_put(release)) for _ in range(2)]
        time.sleep(0.3)
        start = time.monotonic()
        third = stub.Put.future(_stalled_put(release))
        error = third.exception(timeout=5)
        assert time.monotonic() - start < 1.0
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 Put streams are running (half of max_concurrent_rpcs); retry later" in error.details()
        assert stub.Lookup(pb.LookupRequest(namespace=NS, keys=[key(1)]), timeout=1).num_hits == 0
        assert not any(call.done() for call in held)
    finally:
        release.set()
        channel.close()
        handle.stop(grace_s=0.5)
