"""The Redis tier: each batch split into pipelines on several connections in parallel.

A block is one string value, the sealed frame (`header || payload`), under
`{key_prefix}{escaped namespace}:{key hex}`, so `redis-cli --scan` shows readable keys and a
namespace is one SCAN pattern. The namespace is percent-encoded (`tiers.base.escape_namespace`):
it holds no ':' then, so `tenant`'s pattern cannot match `tenant:b`'s keys. Expiry is Redis's own
(PX); a key Redis evicted under maxmemory is simply absent, i.e. a miss. Timeouts are short and
redis-py's own retries are off: the store's `TierGuard` decides when to try again, so a dead Redis
costs one refused connect, not seconds.

Throughput: a get or put of several blocks is cut into `batch_connections` contiguous pipelines
(balanced by bytes for puts) that run at once, each on its own pooled connection, so one
connection's parsing in Python overlaps the server's sends and another connection's socket reads.
(On the 2-core VM with Redis on loopback, 1, 2, 4 and 8 connections were within the noise of each
other, 0.20-0.25 GB/s for gets of 11 MiB blocks: there the client is CPU-bound in redis-py's reply
parser and the server shares the cores. Gets run at 0.8-1.3x bare pipelined redis-py GETs of the
same values; docs/performance.md.)
With `cluster: true` the client is redis-py's `RedisCluster` (same URL shape, any one node): each of
those pipelines is a cluster pipeline, which groups its commands per node and writes to every node
before reading, and SCAN walks every primary.

Copies: a put sends each frame as its header and the caller's payload object, one after the other
in the same SET (`_FramePacker`), instead of joining them into one value first; a get decodes the
frame in place (the payload is a read-only memoryview into redis-py's reply, not a copy of it).
"""

from __future__ import annotations

import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.connection import Encoder, PythonRespSerializer
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from kvstore.checksum import HEADER_BYTES, SealedBlock
from kvstore.config import RedisTierConfig
from kvstore.tiers.base import Evicted, Tier, TierError, TierUsage, escape_namespace, unescape_namespace

T = TypeVar("T")
_SCAN_BATCH = 1000
# redis-py's pure-Python reader pulls replies in chunks of this size; its 32 KiB default halves
# GET throughput on MiB-sized blocks (measured 45 vs 89 MB/s for 8 MiB values on a loaded 2-core box).
_READ_CHUNK = 1 << 20
_GLOB_SPECIAL = re.compile(rb"([*?\[\]\\])")
_FAILURES = (redis.RedisError, RedisClusterException, OSError)


class _Frame:
    """A SET value sent as two buffers: a block's header and its payload, unjoined."""

    __slots__ = ("header", "payload")

    def __init__(self, block: SealedBlock):
        self.header = block.header()
        self.payload = block.payload


class _FramePacker(PythonRespSerializer):
    """redis-py's command serializer, plus `_Frame` arguments written as one bulk string whose
    bytes are the header and then the payload, each its own buffer for `sendall`.

    redis-py takes a value as one contiguous argument, and `header + payload` copies every block
    into a fresh allocation: measured on the 2-core VM (pipelines of 4 SETs of 11 MiB), puts moved
    0.33-0.41 GB/s with the join and 0.57-0.84 GB/s without it.
    """

    def __init__(self) -> None:
        # redis-py's own defaults: values of 6000 bytes and more go out as separate buffers, and
        # strings are UTF-8 (this tier never sets another encoding).
        super().__init__(6000, Encoder("utf-8", "strict", False).encode)

    def pack(self, *args):
        if not any(type(arg) is _Frame for arg in args):
            return super().pack(*args)
        output, buff = [], b"*%d\r\n" % len(args)
        for arg in args:
            if type(arg) is _Frame:
                output += [buff + b"$%d\r\n" % (len(arg.header) + len(arg.payload)), arg.header, arg.payload]
                buff = b"\r\n"
            else:
                data = self.encode(arg)
                buff += b"$%d\r\n" % len(data) + bytes(data) + b"\r\n"
        output.append(buff)
        return output


class _FramePool(redis.BlockingConnectionPool):
    """A blocking pool whose connections pack with `_FramePacker` (the cluster client builds one
    per node from `connection_pool_class`)."""

    def __init__(self, **kwargs):
        super().__init__(command_packer=_FramePacker(), **kwargs)


class RedisTier(Tier):
    """Blocks in a Redis server or cluster, shared by every store that points at it."""

    def __init__(self, cfg: RedisTierConfig):
        self.name = cfg.tier_name
        self.where = cfg.safe_url
        self.ttl_s = cfg.ttl_s
        self._prefix = cfg.key_prefix.encode()
        self._cfg = cfg
        self._fanout = cfg.batch_connections
        # The caller's thread runs one of the pipelines itself; the pool runs the others.
        self._workers = (ThreadPoolExecutor(cfg.batch_connections - 1, thread_name_prefix=f"tier-{self.name}")
                         if cfg.batch_connections > 1 else None)
        self._client_lock = threading.Lock()
        self._client: redis.Redis | RedisCluster | None = None
        if not cfg.cluster:
            self._client = redis.Redis(connection_pool=_FramePool.from_url(
                cfg.url.get_secret_value(), max_connections=cfg.pool_size, **connection_options(cfg)),
                retry=Retry(NoBackoff(), 0))

    def get(self, namespace: str, keys: Sequence[bytes]) -> list[SealedBlock | None]:
        names = [self._name(namespace, key) for key in keys]
        frames = self._batched(names, [1] * len(names), lambda pipe, name: pipe.get(name))
        return [None if frame is None else SealedBlock.from_frame(memoryview(frame)) for frame in frames]

    def contains(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        counts = self._pipelined([self._name(namespace, key) for key in keys], lambda pipe, name: pipe.exists(name))
        return [count == 1 for count in counts]

    def put(self, namespace: str, blocks: Sequence[tuple[bytes, SealedBlock]]) -> list[Evicted]:
        now = time.time()
        writes = []
        for key, block in blocks:
            ttl_ms = self._ttl_ms(block, now)
            if ttl_ms is None or ttl_ms > 0:
                writes.append((self._name(namespace, key), block, ttl_ms))
        self._batched(writes, [len(block.payload) for _, block, _ in writes],
                      lambda pipe, write: pipe.set(write[0], _Frame(write[1]), px=write[2]))
        return []

    def delete(self, namespace: str, keys: Sequence[bytes]) -> int:
        # One DEL per key in a pipeline rather than one multi-key DEL: a cluster needs the keys of one
        # command in one slot, and a pipeline is one round trip per node either way.
        return sum(self._pipelined([self._name(namespace, key) for key in keys], lambda pipe, name: pipe.delete(name)))

    def clear(self, namespace: str) -> int:
        pattern = _GLOB_SPECIAL.sub(rb"\\\1", self._prefix + escape_namespace(namespace).encode() + b":") + b"*"

        def unlink_all() -> int:
            removed, batch = 0, []
            for name in self._connected().scan_iter(match=pattern, count=_SCAN_BATCH):
                batch.append(name)
                if len(batch) == _SCAN_BATCH:
                    removed += sum(self._pipelined(batch, lambda pipe, name: pipe.unlink(name)))
                    batch = []
            return removed + sum(self._pipelined(batch, lambda pipe, name: pipe.unlink(name)))

        return self._call(unlink_all)

    def usage(self) -> dict[str, TierUsage]:
        """One SCAN over this tier's prefix plus pipelined STRLENs: O(blocks), for stats calls."""
        pattern = _GLOB_SPECIAL.sub(rb"\\\1", self._prefix) + b"*"

        def measure() -> dict[str, TierUsage]:
            totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
            names = list(self._connected().scan_iter(match=pattern, count=_SCAN_BATCH))
            for start in range(0, len(names), _SCAN_BATCH):
                chunk = names[start : start + _SCAN_BATCH]
                lengths = self._pipelined(chunk, lambda pipe, name: pipe.strlen(name))
                for name, length in zip(chunk, lengths):
                    if length:
                        namespace = name[len(self._prefix) :].rsplit(b":", 1)[0].decode(errors="replace")
                        counts = totals[unescape_namespace(namespace)]
                        counts[0] += 1
                        counts[1] += max(length - HEADER_BYTES, 0)
            return {ns: TierUsage(blocks, size) for ns, (blocks, size) in totals.items()}

        return self._call(measure)

    def ping(self) -> None:
        self._call(lambda: self._connected().ping())

    def close(self) -> None:
        if self._workers is not None:
            self._workers.shutdown(wait=True)
        with self._client_lock:
            client = self._client
        if isinstance(client, redis.Redis):
            client.close()
            client.connection_pool.disconnect()
        elif client is not None:
            client.close()

    def _connected(self) -> redis.Redis | RedisCluster:
        """The client; a cluster client is built on first use, because building it asks a node for the
        slot map: a cluster that is down when the store starts is an outage for the guard, not a
        store that fails to start."""
        if self._client is not None:
            return self._client
        with self._client_lock:
            if self._client is None:
                self._client = RedisCluster.from_url(
                    self._cfg.url.get_secret_value(), connection_pool_class=_FramePool,
                    max_connections=self._cfg.pool_size, **connection_options(self._cfg))
            return self._client

    def _name(self, namespace: str, key: bytes) -> bytes:
        return self._prefix + escape_namespace(namespace).encode() + b":" + key.hex().encode()

    def _ttl_ms(self, block: SealedBlock, now: float) -> int | None:
        deadlines = [d for d in (block.expires_at, now + self.ttl_s if self.ttl_s else None) if d is not None]
        return max(int((min(deadlines) - now) * 1000), 0) if deadlines else None

    def _pipelined(self, items: Sequence[T], queue: Callable[[object, T], object]) -> list:
        """One pipeline of `queue(pipe, item)` for every item (a cluster pipeline: one per node)."""
        if not items:
            return []

        def run() -> list:
            with self._connected().pipeline(transaction=False) as pipe:
                for item in items:
                    queue(pipe, item)
                return pipe.execute()

        return self._call(run)

    def _batched(self, items: Sequence[T], weights: Sequence[int], queue: Callable[[object, T], object]) -> list:
        """Like `_pipelined`, with the items cut into up to `batch_connections` contiguous runs of about
        equal weight, each its own pipeline on its own connection, all at once; results in item order.
        Every pipeline has finished (or failed) before this returns or raises, so none is left
        holding a connection."""
        runs = split_runs(len(items), weights, self._fanout)
        if len(runs) <= 1:
            return self._pipelined(items, queue)
        futures = [self._workers.submit(self._pipelined, items[start:end], queue) for start, end in runs[1:]]
        results, failure = [], None
        try:
            results += self._pipelined(items[runs[0][0]:runs[0][1]], queue)
        except TierError as error:
            failure = error
        for future in futures:
            try:
                results += future.result()
            except TierError as error:
                failure = failure or error
        if failure is not None:
            raise failure
        return results

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except _FAILURES as error:
            raise TierError(f"redis at {self.where}: {type(error).__name__}: {error}") from None


def connection_options(cfg: RedisTierConfig) -> dict:
    """redis-py options of this tier's connections (`kvstore bench`'s bare client uses them too):
    short timeouts, no retries, 1 MiB socket reads. A cluster client takes `retry` for itself and
    gives its node connections none."""
    return {"timeout": cfg.socket_timeout_s, "socket_timeout": cfg.socket_timeout_s,
            "socket_connect_timeout": cfg.connect_timeout_s, "socket_read_size": _READ_CHUNK,
            "retry": Retry(NoBackoff(), 0)}


def split_runs(count: int, weights: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """[start, end) runs, at most `parts`, that cut `count` items into about equal total weight
    (`kvstore bench`'s bare client cuts its calls with it too, so both run the same pipelines)."""
    parts = min(parts, count)
    if parts <= 1:
        return [(0, count)] if count else []
    total = sum(weights)
    runs, start, acc = [], 0, 0
    for i, weight in enumerate(weights):
        acc += weight
        # Close the run once it holds its share, leaving at least one item for each run still to come.
        if len(runs) < parts - 1 and acc * parts >= total * (len(runs) + 1) and count - i - 1 >= parts - len(runs) - 1:
            runs.append((start, i + 1))
            start = i + 1
    runs.append((start, count))
    return runs
