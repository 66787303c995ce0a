"""The S3 (object store) tier: one object per block, many requests in flight.

Object `{key_prefix}{escaped namespace}/{key hex}` holds the sealed frame (the namespace is
percent-encoded, `tiers.base.escape_namespace`, so one namespace's listing prefix never matches
another's). The block's own expiry is in the frame header, under its checksum; the earlier of it
and this tier's `ttl_s` is in the object's `expires-at` metadata, checked by HEAD on lookup and on
get, because S3 lifecycle rules work in days. One object per block rather than grouping: blocks are
already 0.25-8 MiB (past the size where S3's per-request cost dominates), a prefix hit needs an
arbitrary leading subset of blocks that grouped objects would over-read, and independent objects
let eviction, TTL and checksum repair act on one block. Throughput comes from parallelism instead:
a batch's requests run on a thread pool of `max_inflight` threads at once (boto3 clients are
thread-safe), over a botocore connection pool of the same size. Timeouts are short and retries few,
so an unreachable endpoint costs a refused connect and the store's `TierGuard` decides when to retry.

Copies and passes over the bytes: a get reads the frame's header and then the payload as two reads
of the response body, so the payload is the one buffer botocore reads it into, not a slice copied
out of the frame. botocore's own CRC32 of every body (computed on put, checked on get, since
botocore 1.36) is turned off (`when_required`): each frame carries the block checksum, which the
store verifies on every read, so the CRC was a second pass over every byte on both sides.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from kvstore.checksum import HEADER_BYTES, SealedBlock
from kvstore.config import ObjTierConfig
from kvstore.tiers.base import Evicted, Tier, TierError, TierUsage, escape_namespace, unescape_namespace

T = TypeVar("T")
_MISSING = {"NoSuchKey", "404", "NotFound"}
_DELETE_BATCH = 1000


class ObjTier(Tier):
    """Blocks as objects in one bucket of an S3-compatible store."""

    def __init__(self, cfg: ObjTierConfig):
        self.name = cfg.tier_name
        self.bucket = cfg.bucket
        self.ttl_s = cfg.ttl_s
        self._prefix = cfg.key_prefix
        self._where = f"{cfg.endpoint_url or 's3'}/{cfg.bucket}"
        self._client = s3_client(cfg)
        self._pool = ThreadPoolExecutor(cfg.max_inflight, thread_name_prefix=f"tier-{self.name}")

    def get(self, namespace: str, keys: Sequence[bytes]) -> list[SealedBlock | None]:
        return self._parallel(lambda key: self._get_one(self._name(namespace, key)), keys)

    def contains(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        return self._parallel(lambda key: self._head_one(self._name(namespace, key)), keys)

    def put(self, namespace: str, blocks: Sequence[tuple[bytes, SealedBlock]]) -> list[Evicted]:
        now = time.time()
        self._parallel(lambda entry: self._put_one(self._name(namespace, entry[0]), entry[1], now), blocks)
        return []

    def delete(self, namespace: str, keys: Sequence[bytes]) -> int:
        """S3 does not say whether a deleted key existed: counts the keys asked for."""
        names = [self._name(namespace, key) for key in keys]
        for start in range(0, len(names), _DELETE_BATCH):
            chunk = names[start : start + _DELETE_BATCH]
            self._call(lambda: self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": name} for name in chunk], "Quiet": True}))
        return len(names)

    def clear(self, namespace: str) -> int:
        names = [item["Key"] for item in self._list(f"{self._prefix}{escape_namespace(namespace)}/")]
        for start in range(0, len(names), _DELETE_BATCH):
            chunk = names[start : start + _DELETE_BATCH]
            self._call(lambda: self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": name} for name in chunk], "Quiet": True}))
        return len(names)

    def usage(self) -> dict[str, TierUsage]:
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for item in self._list(self._prefix):
            counts = totals[unescape_namespace(item["Key"][len(self._prefix) :].rsplit("/", 1)[0])]
            counts[0] += 1
            counts[1] += max(item["Size"] - HEADER_BYTES, 0)
        return {ns: TierUsage(blocks, size) for ns, (blocks, size) in totals.items()}

    def ping(self) -> None:
        self._call(lambda: self._client.head_bucket(Bucket=self.bucket))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    def _name(self, namespace: str, key: bytes) -> str:
        return f"{self._prefix}{escape_namespace(namespace)}/{key.hex()}"

    def _get_one(self, name: str) -> SealedBlock | None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=name)
            body = response["Body"]
            if _expired(response.get("Metadata", {}), time.time()):
                # Past this tier's own TTL, which the frame header cannot carry (the header's expiry
                # is under the block's checksum): gone now rather than at the next lifecycle run.
                body.close()
                self._client.delete_object(Bucket=self.bucket, Key=name)
                return None
            header = SealedBlock.from_frame(body.read(HEADER_BYTES))
            if header.length < 0:
                body.close()
                return header
            return SealedBlock(body.read(), header.checksum, header.length, header.expires_at)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in _MISSING:
                return None
            raise self._tier_error(error) from None
        except (BotoCoreError, OSError) as error:
            raise self._tier_error(error) from None

    def _head_one(self, name: str) -> bool:
        try:
            response = self._client.head_object(Bucket=self.bucket, Key=name)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in _MISSING:
                return False
            raise self._tier_error(error) from None
        except (BotoCoreError, OSError) as error:
            raise self._tier_error(error) from None
        return not _expired(response.get("Metadata", {}), time.time())

    def _put_one(self, name: str, block: SealedBlock, now: float) -> None:
        deadline = min((d for d in (block.expires_at, now + self.ttl_s if self.ttl_s else None) if d is not None),
                       default=None)
        if deadline is not None and deadline <= now:
            return
        metadata = {} if deadline is None else {"expires-at": repr(deadline)}
        self._call(lambda: self._client.put_object(Bucket=self.bucket, Key=name, Body=block.frame(), Metadata=metadata))

    def _list(self, prefix: str) -> list[dict]:
        def list_all() -> list[dict]:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            return [item for page in pages for item in page.get("Contents", [])]

        return self._call(list_all)

    def _parallel(self, fn: Callable[..., T], items: Sequence) -> list[T]:
        """`fn` of every item, up to `max_inflight` at once; every call has finished (or failed)
        before this returns or raises, so no request of a failed batch is still running after it."""
        if len(items) <= 1:
            return [fn(item) for item in items]
        futures: list[Future] = [self._pool.submit(fn, item) for item in items]
        results, failure = [], None
        for future in futures:
            try:
                results.append(future.result())
            except TierError as error:
                failure = failure or error
        if failure is not None:
            raise failure
        return results

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (BotoCoreError, ClientError, OSError) as error:
            raise self._tier_error(error) from None

    def _tier_error(self, error: Exception) -> TierError:
        return TierError(f"object store {self._where}: {type(error).__name__}: {error}")


def s3_client(cfg: ObjTierConfig):
    """The boto3 client of an `obj` tier: short timeouts, few retries, a connection pool of
    `max_inflight`, botocore's redundant body CRC off (see the module docstring). `kvstore bench`
    times raw get_object calls with this same client."""
    config = Config(
        connect_timeout=cfg.connect_timeout_s,
        read_timeout=cfg.read_timeout_s,
        retries={"max_attempts": cfg.max_attempts, "mode": "standard"},
        max_pool_connections=cfg.max_inflight,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path" if cfg.endpoint_override else "auto"},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=cfg.endpoint_url,
        region_name=cfg.region,
        aws_access_key_id=cfg.access_key.get_secret_value() if cfg.access_key else None,
        aws_secret_access_key=cfg.secret_key.get_secret_value() if cfg.secret_key else None,
        config=config,
    )


def _expired(metadata: dict[str, str], now: float) -> bool:
    """Whether an object's `expires-at` metadata has passed; an unreadable one has (never raises:
    an exception here would mark the whole tier down)."""
    value = metadata.get("expires-at")
    if value is None:
        return False
    try:
        return not float(value) > now
    except ValueError:
        return True
