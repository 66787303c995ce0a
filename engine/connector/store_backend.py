"""The kvstore daemon as the connector's store: lookups on a short deadline, transfers in the background."""

from __future__ import annotations

import logging
import os
from typing import Protocol

from engine.connector.config import OffloadConfig
from engine.connector.pinned_segments import PinnedSegments
from kvstore.config import ConfigError
from kvstore.shm_client import ShmTransport
from kvstore.shm_segment import SlotLease
from kvstore.store import LookupResult, TierUsage

logger = logging.getLogger(__name__)


class BlockStore(Protocol):
    """What the daemon transfer path needs of a store (`DaemonStore` provides it)."""

    def lookup(self, namespace: str, keys: list[bytes]) -> LookupResult: ...
    def get(self, namespace: str, keys: list[bytes]) -> list[bytes | None]: ...
    def put(self, namespace: str, blocks: list[tuple[bytes, bytes]], *, tiers: list[str] | None = None,
            ttl_s: float | None = None) -> int: ...
    def stats(self) -> dict[str, dict[str, TierUsage]]: ...
    def health(self) -> dict[str, bool]: ...
    def close(self) -> None: ...


_KEY = "kv_transfer_config.kv_connector_extra_config"
# Shared-memory slots for loads, beyond the `max_pending_saves` slots that stage saves: a load of
# up to this many blocks lands in the segment and is copied from there into its pages.
SHM_LOAD_SLOTS = 32


class DaemonStore:
    """The kvstore daemon through two channels: lookups (on the scheduler's path, at admission)
    get a short deadline and no retries, so a hung daemon costs one `lookup_timeout_s`; loads and
    saves run in background threads and get the long deadline and the client's retries."""

    def __init__(self, url: str, token: str | None, lookup_timeout_s: float, transfer_timeout_s: float,
                 shm: bool | str = False, shm_slot_bytes: int = 0, shm_slots: int = 0) -> None:
        from kvstore.client import KVStoreClient, RetryPolicy

        self._lookups = KVStoreClient(url, token=token, timeout_s=lookup_timeout_s, retry=RetryPolicy(attempts=1))
        self._pinned = PinnedSegments()
        self._transfers = KVStoreClient(url, token=token, timeout_s=transfer_timeout_s,
                                        shm=shm if shm_slot_bytes > 0 and shm_slots > 0 else False,
                                        shm_slot_bytes=max(1, shm_slot_bytes), shm_slots=max(1, shm_slots),
                                        on_shm_segment=self._pinned.register)

    @property
    def shm(self) -> ShmTransport | None:
        """The shared-memory path to the daemon while attached (same host), else None."""
        return self._transfers.shm

    @property
    def shm_error(self) -> str:
        return self._transfers.shm_error

    def put_slots(self, namespace: str, lease: SlotLease, blocks: list[tuple[bytes, int]], *,
                  tiers: list[str] | None = None, ttl_s: float | None = None) -> int:
        return self._transfers.put_slots(namespace, lease, blocks, tiers=tiers, ttl_s=ttl_s)

    def get_slots(self, namespace: str, lease: SlotLease, keys: list[bytes]) -> list[int | None]:
        return self._transfers.get_slots(namespace, lease, keys)

    def lookup(self, namespace: str, keys: list[bytes]) -> LookupResult:
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
        self._pinned.close()   # unregister while the segment is still mapped
        self._transfers.close()


def open_store(cfg: OffloadConfig, block_bytes: int = 0) -> DaemonStore:
    """Connect to the kvstore daemon named by `kvstore_url`; a daemon that does not answer is a
    start-up error.

    With `kvstore_shm` on, a shared-memory segment of `block_bytes` slots stages the transfers
    (`max_pending_saves` for saves plus SHM_LOAD_SLOTS for loads).
    """
    ignored = [key for key in ("cpu_bytes_to_use", "secondary_tiers") if key in cfg.model_fields_set]
    if ignored:
        logger.warning("%s: %s ignored: with kvstore_url the daemon's own config sets its tiers",
                       _KEY, " and ".join(ignored))
    token = cfg.auth_token.get_secret_value() if cfg.auth_token else None
    if token is None and cfg.auth_token_env:
        token = os.environ.get(cfg.auth_token_env)
    store = DaemonStore(cfg.kvstore_url, token, cfg.lookup_timeout_s, cfg.load_timeout_s, cfg.kvstore_shm,
                        block_bytes, cfg.max_pending_saves + SHM_LOAD_SLOTS)
    try:
        health = store.health()
    except Exception as e:
        store.close()
        raise ConfigError(f"{_KEY}.kvstore_url: cannot reach the kvstore daemon ({e})") from None
    if cfg.kvstore_shm is True and block_bytes and store.shm is None:
        store.close()
        raise ConfigError(f"{_KEY}.kvstore_shm: the daemon refused shared memory ({store.shm_error}); "
                          f'set it to "auto" or false to use the gRPC payload path')
    down = [name for name, up in health.items() if not up]
    if down:
        logger.warning("kvstore daemon reports tier(s) down: %s; it keeps serving from the others", down)
    logger.info("offloading to the kvstore daemon at %s (tiers %s, %s)", cfg.kvstore_url, list(health),
                "shared memory" if store.shm is not None else "gRPC payloads")
    return store
