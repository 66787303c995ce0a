"""Helpers for the daemon tests: a real kvstore gRPC server on a loopback port, and test blocks."""

from __future__ import annotations

import contextlib
import hashlib

from kvstore.client import KVStoreClient
from kvstore.config import parse_store_config
from kvstore.server import ServerHandle, serve

NS = "ns-test"


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def payload(i: int, size: int) -> bytes:
    """Distinct, reproducible bytes for block i (so a mixed-up block is caught)."""
    seed = hashlib.blake2b(i.to_bytes(8, "big") + size.to_bytes(8, "big")).digest()
    return (seed * (size // len(seed) + 1))[:size]


@contextlib.contextmanager
def running_daemon(tiers: list[dict] | None = None, **config):
    """A daemon on 127.0.0.1:<free port>; yields (handle, url)."""
    cfg = parse_store_config({"listen": "127.0.0.1:0", "tiers": tiers or [{"type": "memory", "bytes": "256MiB"}],
                              **config})
    handle: ServerHandle = serve(cfg, workers=32)
    try:
        yield handle, f"grpc://127.0.0.1:{handle.port}"
    finally:
        handle.stop(grace_s=0.5)


@contextlib.contextmanager
def daemon_and_client(tiers: list[dict] | None = None, token: str | None = None, **config):
    """A daemon and one sync client of it; yields (handle, client)."""
    with running_daemon(tiers, **config) as (handle, url), KVStoreClient(url, token=token, timeout_s=20) as client:
        yield handle, client
