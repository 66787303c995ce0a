"""The kvstore daemon as the connector's store: its slab mapped on the same host, else gRPC payloads.

`open_store` picks the path. With a daemon on this host (`kvstore_shm` "auto" and a loopback
`kvstore_url`, or `kvstore_shm: true`) whose memory tier is a slab of slots of exactly this engine's
block size, the engine maps the slab and DMAs blocks into the daemon's slots
(engine/connector/daemon_slab_store.py, moved by `SlabTransfer`). Otherwise blocks travel as gRPC
payloads (`DaemonStore`, moved by `BlockTransfer`).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
import os
from typing import Protocol

from engine.connector.config import OffloadConfig
from engine.connector.daemon_slab_store import DaemonSlabStore
from kvstore.client import KVStoreClient, RetryPolicy, Target
from kvstore.config import ConfigError
from kvstore.slab_client import SlabRefused, is_local_host
from kvstore.store import LookupResult, TierUsage

logger = logging.getLogger(__name__)


class BlockStore(Protocol):
    """What the payload transfer path needs of a store (`DaemonStore` provides it)."""

    def lookup(self, namespace: str, keys: list[bytes], skip: Collection[str] = ()) -> LookupResult: ...
    def get(self, namespace: str, keys: list[bytes]) -> list[bytes | None]: ...
    def put(self, namespace: str, blocks: list[tuple[bytes, bytes]], *, tiers: list[str] | None = None,
            ttl_s: float | None = None) -> int: ...
    def stats(self) -> dict[str, dict[str, TierUsage]]: ...
    def health(self) -> dict[str, bool]: ...
    def close(self) -> None: ...


_KEY = "kv_transfer_config.kv_connector_extra_config"


class DaemonStore:
    """The kvstore daemon through two channels: lookups (on the scheduler's path, at admission)
    get a short deadline and no retries, so a hung daemon costs one `lookup_timeout_s`; loads and
    saves run in background threads and get the long deadline and the client's retries."""

    def __init__(self, url: str, token: str | None, lookup_timeout_s: float, transfer_timeout_s: float) -> None:
        self._lookups = KVStoreClient(url, token=token, timeout_s=lookup_timeout_s, retry=RetryPolicy(attempts=1))
        self._transfers = KVStoreClient(url, token=token, timeout_s=transfer_timeout_s)

    def lookup(self, namespace: str, keys: list[bytes], skip: Collection[str] = ()) -> LookupResult:
        """The daemon's Lookup; it asks each of its tiers (`skip` is for an embedded store's tiers)."""
        return self._lookups.lookup(namespace, keys)

    def get(self, namespace: str, keys: list[bytes]) -> list[bytes | None]:
        return self._transfers.get(namespace, keys)

    def put(self, namespace: str, blocks: list[tuple[bytes, bytes]], *, tiers: list[str] | None = None,
            ttl_s: float | None = None) -> int:
        return self._transfers.put(namespace, blocks, tiers=tiers, ttl_s=ttl_s)

    def stats(self) -> dict[str, dict[str, TierUsage]]:
        return self._transfers.stats()

    def health(self) -> dict[str, bool]:
        return self._transfers.health()

    def close(self) -> None:
        self._lookups.close()
        self._transfers.close()


def open_store(cfg: OffloadConfig, block_bytes: int, pin: bool) -> DaemonStore | DaemonSlabStore:
    """Connect to the kvstore daemon named by `kvstore_url` (a daemon that does not answer is a
    start-up error), through its slab when it is on this host and its slots hold one block each."""
    ignored = [key for key in ("cpu_bytes_to_use", "secondary_tiers") if key in cfg.model_fields_set]
    if ignored:
        logger.warning("%s: %s ignored: with kvstore_url the daemon's own config sets its tiers",
                       _KEY, " and ".join(ignored))
    token = cfg.auth_token.get_secret_value() if cfg.auth_token else None
    if token is None and cfg.auth_token_env:
        token = os.environ.get(cfg.auth_token_env)
    store = DaemonStore(cfg.kvstore_url, token, cfg.lookup_timeout_s, cfg.load_timeout_s)
    try:
        health = store.health()
    except Exception as e:
        store.close()
        raise ConfigError(f"{_KEY}.kvstore_url: cannot reach the kvstore daemon ({e})") from None
    down = [name for name, up in health.items() if not up]
    if down:
        logger.warning("kvstore daemon reports tier(s) down: %s; it keeps serving from the others", down)
    same_host = is_local_host(Target.parse(cfg.kvstore_url).address)
    if cfg.kvstore_shm is True or (cfg.kvstore_shm == "auto" and same_host):
        try:
            slab_store = DaemonSlabStore.connect(cfg.kvstore_url, token, block_bytes, pin, list(health),
                                                 cfg.lookup_timeout_s, cfg.load_timeout_s)
        except SlabRefused as refused:
            if cfg.kvstore_shm is True:
                store.close()
                raise ConfigError(f"{_KEY}.kvstore_shm: the daemon's slab cannot be used ({refused}); set it to "
                                  f'"auto" or false to use the gRPC payload path') from None
            logger.info("kvstore daemon's slab not used (%s); blocks travel as gRPC payloads", refused)
        else:
            store.close()
            logger.info("offloading to the kvstore daemon at %s through its slab (tiers %s)", cfg.kvstore_url,
                        list(health))
            return slab_store
    logger.info("offloading to the kvstore daemon at %s (tiers %s, gRPC payloads)", cfg.kvstore_url, list(health))
    return store
