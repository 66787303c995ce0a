"""`kvstore bench`: put/get throughput (GB/s) and p50/p99 call latency per tier and block size.

Against a running daemon (`--url`) each tier the daemon reports is measured by putting through that
tier alone and reading the blocks back once (run the daemon with `promote_on_hit: false` so reads
from a lower tier are not also copies into the faster ones). Without a URL, each configured tier is
measured as its own in-process single-tier store. Every block read back is compared with what was
put: a wrong or missing block is counted, never silently timed.

With `--shm`, the same daemon's slab (kvstore/slab_client.py) is measured beside the payload path, by
value: a put leases slots, copies the blocks in, checksums them and commits them; a get leases the
slots of the blocks and copies them out. Slots have one size, so only the block size equal to the
daemon's `slot_bytes` is measured this way. An engine does neither copy (its GPU DMAs into and out of
the slots and checksums there): these rows bound the control path, gRPC calls and leases, from above.

In-process, a Redis or S3 tier's get rate is printed beside the same-run rate of its bare client
moving the same bytes (`raw get GB/s`, and `get/raw`): pipelined redis-py GETs of values of the
frame's size, cut into the tier's `batch_connections` pipelines on as many threads, or boto3
get_object calls, `max_inflight` at once, with the tier's own client settings, in the same calls of
`batch` blocks. The ratio is the tier's own cost (framing, verification, bookkeeping), apart from
how fast the endpoint and its client are on the machine.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kvstore.checksum import HEADER_BYTES, block_checksum
from kvstore.config import ObjTierConfig, RedisTierConfig, StoreConfig, TierConfig
from kvstore.store import TieredStore

DEFAULT_BLOCK_SIZES = (256 << 10, 1 << 20, 2 << 20, 4 << 20, 8 << 20)
_DISTINCT_PAYLOADS = 4


@dataclass(frozen=True)
class BenchResult:
    """One (tier, block size) measurement; latencies are per call of `batch` blocks."""

    mode: str
    tier: str
    block_bytes: int
    blocks: int
    batch: int
    put_gbps: float
    put_p50_ms: float
    put_p99_ms: float
    get_gbps: float
    get_p50_ms: float
    get_p99_ms: float
    bad_blocks: int
    # The bare client moving the same bytes in the same run (Redis and S3 tiers in-process only).
    raw_get_gbps: float | None = None

    @property
    def get_vs_raw(self) -> float | None:
        return None if self.raw_get_gbps is None else self.get_gbps / self.raw_get_gbps


def _percentile(samples: list[float], q: float) -> float:
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def _timed_calls(calls: list[Callable[[], object]],
                 beside: list[Callable[[], object]] | None = None) -> tuple[list[float], float, list[object]]:
    """Run calls one after another; per-call seconds, total seconds (of `calls` alone), and the
    results. `beside[i]`, if given, runs right after `calls[i]`, outside the timing."""
    latencies, results = [], []
    for i, call in enumerate(calls):
        t0 = time.perf_counter()
        results.append(call())
        latencies.append(time.perf_counter() - t0)
        if beside is not None:
            beside[i]()
    return latencies, sum(latencies), results


def bench_tier(store, mode: str, tier: str, block_bytes: int, blocks: int, batch: int,
               put_tiers: list[str] | None, raw: RawRedis | RawS3 | None = None) -> BenchResult:
    """Put `blocks` blocks through `store` in calls of `batch`, then get each back once. With `raw`,
    the bare client's values of the same size are read back too, each call right after the store's
    call of the same blocks, so both see the same load on the machine."""
    namespace = f"bench-{uuid.uuid4().hex[:12]}"
    # A few distinct random payloads (not one per block) keep the bench's own memory small.
    payloads = [os.urandom(block_bytes) for _ in range(min(_DISTINCT_PAYLOADS, blocks))]
    keys = [uuid.uuid4().bytes for _ in range(blocks)]
    groups = [list(range(i, min(i + batch, blocks))) for i in range(0, blocks, batch)]

    def put_call(group: list[int]) -> Callable[[], object]:
        return lambda: store.put(namespace, [(keys[i], payloads[i % len(payloads)]) for i in group], tiers=put_tiers)

    def get_call(group: list[int]) -> Callable[[], object]:
        return lambda: store.get(namespace, [keys[i] for i in group])

    beside = _RawGets(raw, block_bytes + HEADER_BYTES, blocks, batch) if raw is not None else None
    try:
        put_lat, put_total, _ = _timed_calls([put_call(g) for g in groups])
        get_lat, get_total, got = _timed_calls([get_call(g) for g in groups], beside and beside.calls)
    finally:
        store.delete(namespace, keys)
        if beside is not None:
            beside.close()
    bad = sum(payload != payloads[i % len(payloads)]
              for group, payloads_back in zip(groups, got) for i, payload in zip(group, payloads_back))
    volume = block_bytes * blocks / 1e9
    return BenchResult(
        mode=mode, tier=tier, block_bytes=block_bytes, blocks=blocks, batch=batch,
        put_gbps=volume / put_total, put_p50_ms=_percentile(put_lat, 50) * 1e3, put_p99_ms=_percentile(put_lat, 99) * 1e3,
        get_gbps=volume / get_total, get_p50_ms=_percentile(get_lat, 50) * 1e3, get_p99_ms=_percentile(get_lat, 99) * 1e3,
        bad_blocks=bad, raw_get_gbps=None if beside is None else volume / beside.seconds(),
    )


class SlabByValue:
    """The daemon's slab with the store interface the bench drives: blocks copied into and out of slots."""

    def __init__(self, slab, control) -> None:
        self.slab = slab          # a kvstore.slab_client.SlabClient
        self.control = control    # a KVStoreClient of the same daemon, for deletes
        self.slot_bytes = slab.slot_bytes

    def put(self, namespace: str, blocks: list[tuple[bytes, bytes]], tiers: list[str] | None = None) -> int:
        slots = self.slab.allocate(len(blocks))
        for slot, (_, payload) in zip(slots, blocks):
            self.slab.view(slot)[:] = payload
        placed = blocks[:len(slots)]
        sums = [block_checksum(payload, namespace, key) for key, payload in placed]
        return self.slab.commit(namespace, [key for key, _ in placed], slots, sums, [None] * len(slots), tiers=tiers)

    def get(self, namespace: str, keys: list[bytes]) -> list[bytes | None]:
        found = self.slab.acquire(namespace, keys)
        try:
            payloads = [bytes(self.slab.view(b.slot)[:b.length]) for b in found]
        finally:
            self.slab.release([b.slot for b in found])
        return payloads + [None] * (len(keys) - len(found))

    def delete(self, namespace: str, keys: list[bytes]) -> int:
        return self.control.delete(namespace, keys)


def bench_grpc_baseline(block_sizes: list[int], blocks: int, batch: int) -> list[BenchResult]:
    """Raw gRPC over loopback moving the same calls of bytes (see kvstore/grpc_baseline.py)."""
    from kvstore.grpc_baseline import RawGrpcLoopback

    results = []
    with RawGrpcLoopback() as raw:
        for size in block_sizes:
            _progress(f"raw gRPC baseline: {blocks} blocks of {size >> 10} KiB ...")
            payload = os.urandom(size)
            calls = [min(batch, blocks - i) for i in range(0, blocks, batch)]
            put_lat, put_total, _ = _timed_calls([lambda n=n: raw.put([payload] * n) for n in calls])
            get_lat, get_total, got = _timed_calls([lambda n=n: raw.get(n * size) for n in calls])
            volume = size * blocks / 1e9
            results.append(BenchResult(
                mode="raw-grpc", tier="-", block_bytes=size, blocks=blocks, batch=batch,
                put_gbps=volume / put_total, put_p50_ms=_percentile(put_lat, 50) * 1e3,
                put_p99_ms=_percentile(put_lat, 99) * 1e3, get_gbps=volume / get_total,
                get_p50_ms=_percentile(get_lat, 50) * 1e3, get_p99_ms=_percentile(get_lat, 99) * 1e3,
                bad_blocks=sum(n * size != received for n, received in zip(calls, got)),
            ))
    return results


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_in_process(cfg: StoreConfig, block_sizes: list[int], blocks: int, batch: int) -> list[BenchResult]:
    """Each configured tier alone, as an embedded single-tier store (no promotion)."""
    results = []
    for tier_cfg in cfg.tiers:
        results += _bench_single_tier(tier_cfg, block_sizes, blocks, batch)
    return results


def _bench_single_tier(tier_cfg: TierConfig, block_sizes: list[int], blocks: int, batch: int) -> list[BenchResult]:
    raw = _raw_client(tier_cfg)
    try:
        with TieredStore([tier_cfg], promote_on_hit=False) as store:
            results = []
            for size in block_sizes:
                _progress(f"in-process {tier_cfg.tier_name}: {blocks} blocks of {size >> 10} KiB ...")
                results.append(bench_tier(store, "in-process", tier_cfg.tier_name, size, blocks, batch, None, raw))
            return results
    finally:
        if raw is not None:
            raw.close()


class RawRedis:
    """Bare redis-py (or RedisCluster) with the tier's connection settings: a call of keys is cut
    into `batch_connections` contiguous pipelines that run at once, as the tier does."""

    def __init__(self, cfg: RedisTierConfig) -> None:
        import redis
        from redis.cluster import RedisCluster

        from kvstore.tiers.redis import connection_options

        url, options = cfg.url.get_secret_value(), connection_options(cfg)
        if cfg.cluster:
            self.client = RedisCluster.from_url(url, connection_pool_class=redis.BlockingConnectionPool,
                                                max_connections=cfg.pool_size, **options)
        else:
            self.client = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
                url, max_connections=cfg.pool_size, **options))
        self.parallel = cfg.batch_connections
        self.prefix = f"{cfg.key_prefix}bench-raw-{uuid.uuid4().hex[:12]}:".encode()
        self.workers = ThreadPoolExecutor(self.parallel)

    def names(self, count: int) -> list[bytes]:
        return [self.prefix + b"%d" % i for i in range(count)]

    def put(self, names: list[bytes], values: list[bytes]) -> None:
        self._each_run(names, lambda pipe, i: pipe.set(names[i], values[i]))

    def get(self, names: list[bytes]) -> list:
        return self._each_run(names, lambda pipe, i: pipe.get(names[i]))

    def delete(self, names: list[bytes]) -> None:
        self._each_run(names, lambda pipe, i: pipe.delete(names[i]))

    def close(self) -> None:
        self.workers.shutdown()
        self.client.close()

    def _each_run(self, names: list[bytes], queue: Callable[[object, int], object]) -> list:
        from kvstore.tiers.redis import split_runs

        def run(indexes: range) -> list:
            with self.client.pipeline(transaction=False) as pipe:
                for i in indexes:
                    queue(pipe, i)
                return pipe.execute()

        runs = [range(start, end) for start, end in split_runs(len(names), [1] * len(names), self.parallel)]
        return [value for part in self.workers.map(run, runs) for value in part]


class RawS3:
    """Bare boto3 with the tier's client settings: get_object of each key of a call, `max_inflight`
    at once, each body read whole."""

    def __init__(self, cfg: ObjTierConfig) -> None:
        from kvstore.tiers.obj import s3_client

        self.client = s3_client(cfg)
        self.bucket = cfg.bucket
        self.prefix = f"{cfg.key_prefix}bench-raw-{uuid.uuid4().hex[:12]}/"
        self.workers = ThreadPoolExecutor(cfg.max_inflight)

    def names(self, count: int) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(count)]

    def put(self, names: list[str], values: list[bytes]) -> None:
        list(self.workers.map(lambda i: self.client.put_object(Bucket=self.bucket, Key=names[i], Body=values[i]),
                              range(len(names))))

    def get(self, names: list[str]) -> list[bytes]:
        return list(self.workers.map(
            lambda name: self.client.get_object(Bucket=self.bucket, Key=name)["Body"].read(), names))

    def delete(self, names: list[str]) -> None:
        self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": n} for n in names], "Quiet": True})

    def close(self) -> None:
        self.workers.shutdown()
        self.client.close()


def _raw_client(tier_cfg: TierConfig) -> RawRedis | RawS3 | None:
    if isinstance(tier_cfg, RedisTierConfig):
        return RawRedis(tier_cfg)
    if isinstance(tier_cfg, ObjTierConfig):
        return RawS3(tier_cfg)
    return None


class _RawGets:
    """The bare client's side of a tier's get pass: `blocks` values of `value_bytes` (a frame's
    size) written first, then `calls[i]` reads the values of the tier's i-th call of `batch` and
    checks them; `seconds()` is the time those reads took."""

    def __init__(self, raw: RawRedis | RawS3, value_bytes: int, blocks: int, batch: int) -> None:
        self.raw = raw
        values = [os.urandom(value_bytes) for _ in range(min(_DISTINCT_PAYLOADS, blocks))]
        self.names = raw.names(blocks)
        self.stored = [values[i % len(values)] for i in range(blocks)]
        raw.put(self.names, self.stored)
        self.latencies: list[float] = []
        self.calls = [lambda i=i: self._get(i, min(i + batch, blocks)) for i in range(0, blocks, batch)]

    def _get(self, start: int, end: int) -> None:
        t0 = time.perf_counter()
        got = self.raw.get(self.names[start:end])
        self.latencies.append(time.perf_counter() - t0)
        if got != self.stored[start:end]:
            raise RuntimeError(f"the bare {type(self.raw).__name__} client read back other bytes than it wrote")

    def seconds(self) -> float:
        return sum(self.latencies)

    def close(self) -> None:
        self.raw.delete(self.names)


def bench_daemon(clients: dict[str, object], block_sizes: list[int], blocks: int, batch: int) -> list[BenchResult]:
    """Each tier the daemon reports up, written through alone and read back through the daemon,
    once per client (mode name -> client: the payload path, and the slab for its slot size),
    alternating per block size so that both modes see the same machine load."""
    results = []
    first = next(iter(clients.values()))
    for tier, up in first.health().items():
        if not up:
            _progress(f"daemon {tier}: reported down, skipped")
            continue
        for size in block_sizes:
            for mode, client in clients.items():
                if getattr(client, "slot_bytes", size) != size:
                    continue
                _progress(f"{mode} {tier}: {blocks} blocks of {size >> 10} KiB ...")
                results.append(bench_tier(client, mode, tier, size, blocks, batch, [tier]))
    return results


def format_table(results: list[BenchResult]) -> str:
    """A Markdown table of the results."""
    raw = any(r.raw_get_gbps is not None for r in results)
    lines = [
        "| mode | tier | block | blocks x batch | put GB/s | put p50 ms | put p99 ms | get GB/s | get p50 ms | get p99 ms | bad |"
        + (" raw get GB/s | get/raw |" if raw else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if raw else ""),
    ]
    for r in results:
        block = f"{r.block_bytes >> 20} MiB" if r.block_bytes >= 1 << 20 else f"{r.block_bytes >> 10} KiB"
        line = (f"| {r.mode} | {r.tier} | {block} | {r.blocks} x {r.batch} | {r.put_gbps:.3f} | {r.put_p50_ms:.2f} | "
                f"{r.put_p99_ms:.2f} | {r.get_gbps:.3f} | {r.get_p50_ms:.2f} | {r.get_p99_ms:.2f} | {r.bad_blocks} |")
        if raw:
            line += (" - | - |" if r.raw_get_gbps is None else f" {r.raw_get_gbps:.3f} | {r.get_vs_raw:.2f} |")
        lines.append(line)
    return "\n".join(lines)
