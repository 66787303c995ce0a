"""`health_port`: a server of its own answers health checks, so a probe never waits behind the data
port's calls; the data port bounds its Watch streams (each holds one of its threads), so its Checks
always have threads. Both answer SERVING at once with every Watch slot taken; the health port says
what the data port says, serves Check only, and its port comes from `kvstore serve --health-port`."""

import contextlib
import re
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.config import parse_store_config
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.server import HEALTH_THREADS, SERVICE_NAME, serve, tier_service_name
from service_daemon import NS

WORKERS = 4
SERVING = health_pb2.HealthCheckResponse.SERVING


@contextlib.contextmanager
def _daemon():
    cfg = parse_store_config({"listen": "127.0.0.1:0", "health_port": 0,
                              "tiers": [{"type": "memory", "bytes": "16MiB"}]})
    handle = serve(cfg, workers=WORKERS)
    try:
        yield handle
    finally:
        handle.stop(grace_s=0.2)


def _check(address: str, service: str = "", timeout_s: float = 5.0) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s).status


def _stalled_put(release: threading.Event):
    yield pb.PutRequest(header=pb.PutHeader(namespace=NS))
    release.wait()


def _watch_answers(channel: grpc.Channel, timeout_s: float) -> bool:
    """Whether a new Watch stream gets its first status within `timeout_s` (a slot may free late)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=1)
        try:
            return next(watch).status == SERVING
        except grpc.RpcError:
            time.sleep(0.05)
        finally:
            watch.cancel()
    return False


def test_watch_streams_are_bounded_and_both_ports_answer_checks_at_once():
    with _daemon() as handle:
        data, health_address = f"127.0.0.1:{handle.port}", f"127.0.0.1:{handle.health_port}"
        channel = grpc.insecure_channel(data)
        release = threading.Event()
        calls = [pb_grpc.KVStoreStub(channel).Put.future(_stalled_put(release)) for _ in range(WORKERS // 2)]
        watches = [health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
                   for _ in range(HEALTH_THREADS // 2)]
        try:
            for watch in watches:
                assert next(watch).status == SERVING
            # Each open Watch holds a thread of the data port: one more is refused, not queued.
            one_more = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
            with pytest.raises(grpc.RpcError) as refused:
                next(one_more)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details() == f"at most {HEALTH_THREADS // 2} health Watch streams at once; poll with Check"
            for address in (data, health_address):
                started = time.monotonic()
                assert _check(address, timeout_s=1.0) == SERVING
                assert time.monotonic() - started < 1.0
            # A slot comes back when its stream ends.
            watches.pop().cancel()
            assert _watch_answers(channel, timeout_s=5.0)
        finally:
            release.set()
            for call in [*calls, *watches]:
                call.cancel()
            channel.close()


def test_health_port_says_what_the_data_port_says_and_serves_check_only():
    with _daemon() as handle:
        data, health_address = f"127.0.0.1:{handle.port}", f"127.0.0.1:{handle.health_port}"
        for service in ("", SERVICE_NAME, tier_service_name("memory")):
            assert _check(health_address, service) == _check(data, service) == SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            _check(health_address, "no-such-service")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        with grpc.insecure_channel(health_address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
            with pytest.raises(grpc.RpcError) as info:
                next(watch)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as stopped:
        _check(health_address, timeout_s=0.5)
    assert stopped.value.code() == grpc.StatusCode.UNAVAILABLE


def test_serve_health_port_flag_starts_the_health_server():
    proc = subprocess.Popen([sys.executable, "-m", "kvstore.cli", "serve", "--port", "0", "--health-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving on" in proc.stdout.readline()
        logged = ""
        while "health checks on" not in logged:
            logged = proc.stderr.readline()
            assert logged, "kvstore serve ended without logging its health port"
        health_address = re.search(r"health checks on (127\.0\.0\.1:\d+)$", logged.rstrip()).group(1)
        assert _check(health_address) == SERVING
    finally:
        proc.terminate()
        proc.wait(timeout=30)
