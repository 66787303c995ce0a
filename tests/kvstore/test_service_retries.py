"""Client retries: UNAVAILABLE is retried with backoff until the daemon answers; deadlines are enforced."""

import asyncio
import threading
import time

import grpc
import pytest

from fixtures_services import free_port
from kvstore.client import AsyncKVStoreClient, KVStoreClient, KVStoreError, RetryPolicy
from kvstore.config import parse_store_config
from kvstore.server import serve
from service_daemon import NS, key

PATIENT = RetryPolicy(attempts=8, backoff_s=0.1, max_backoff_s=0.5)


def _serve_later(port: int, delay_s: float, started: list) -> threading.Thread:
    def start():
        time.sleep(delay_s)
        started.append(serve(parse_store_config({"listen": f"127.0.0.1:{port}"}), workers=4))

    thread = threading.Thread(target=start)
    thread.start()
    return thread


def test_sync_client_retries_until_the_daemon_is_up():
    port, started = free_port(), []
    thread = _serve_later(port, 0.5, started)
    try:
        with KVStoreClient(f"grpc://127.0.0.1:{port}", retry=PATIENT, timeout_s=2) as client:
            assert client.put(NS, [(key(1), b"late")]) == 1
            assert client.get(NS, [key(1)]) == [b"late"]
    finally:
        thread.join()
        started[0].stop(0)


def test_async_client_retries_until_the_daemon_is_up():
    port, started = free_port(), []

    async def scenario():
        async with AsyncKVStoreClient(f"grpc://127.0.0.1:{port}", retry=PATIENT, timeout_s=2) as client:
            assert await client.put(NS, [(key(2), b"late")]) == 1
            assert await client.get(NS, [key(2)]) == [b"late"]

    thread = _serve_later(port, 0.5, started)
    try:
        asyncio.run(scenario())
    finally:
        thread.join()
        started[0].stop(0)


def test_gives_up_after_its_attempts_with_the_last_status():
    port = free_port()  # nothing listens here
    with KVStoreClient(f"grpc://127.0.0.1:{port}", retry=RetryPolicy(attempts=2, backoff_s=0.01), timeout_s=1) as client:
        start = time.monotonic()
        with pytest.raises(KVStoreError) as info:
            client.lookup(NS, [key(1)])
        assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert info.value.method == "Lookup"
        assert time.monotonic() - start < 5


def test_a_restarted_daemon_is_reached_by_the_next_call():
    """After an outage long enough for gRPC's reconnect backoff to grow, a call made right after the
    daemon is back on the same port succeeds (the default retry window covers the reconnect)."""
    port = free_port()
    config = parse_store_config({"listen": f"127.0.0.1:{port}"})
    daemon = serve(config, workers=4)
    with KVStoreClient(f"grpc://127.0.0.1:{port}", timeout_s=2) as client:
        assert client.put(NS, [(key(1), b"before")]) == 1
        daemon.stop(0)
        down_since = time.monotonic()
        while time.monotonic() - down_since < 4:   # the channel fails, and backs off, for 4 s
            with pytest.raises(KVStoreError) as info:
                client.lookup(NS, [key(1)])
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
        daemon = serve(config, workers=4)
        try:
            start = time.monotonic()
            assert client.put(NS, [(key(2), b"after")]) == 1
            assert time.monotonic() - start < 2
            assert client.get(NS, [key(1), key(2)]) == [None, b"after"]
        finally:
            daemon.stop(0)


def test_a_restarted_daemon_is_reached_by_the_next_async_call():
    port = free_port()
    config = parse_store_config({"listen": f"127.0.0.1:{port}"})
    daemons = [serve(config, workers=4)]

    async def scenario():
        async with AsyncKVStoreClient(f"grpc://127.0.0.1:{port}", timeout_s=2) as client:
            assert await client.put(NS, [(key(1), b"before")]) == 1
            daemons[0].stop(0)
            down_since = time.monotonic()
            while time.monotonic() - down_since < 4:
                with pytest.raises(KVStoreError):
                    await client.lookup(NS, [key(1)])
            daemons.append(serve(config, workers=4))
            start = time.monotonic()
            assert await client.put(NS, [(key(2), b"after")]) == 1
            assert time.monotonic() - start < 2

    try:
        asyncio.run(scenario())
    finally:
        daemons[-1].stop(0)
