"""The S3 tier's concurrent batches against moto: exact bytes of MiB-sized blocks with several
requests in flight (as many as `max_inflight`, no more), the object each put leaves, and an endpoint
that stops or stalls with a batch in flight (TierError or misses within the timeouts, never a hang)."""

import itertools
import random
import socket
import threading
import time

import pytest

from fixtures_services import make_bucket, obj_tier, s3_client, start_moto
from kvstore.checksum import SealedBlock
from kvstore.config import parse_tiers
from kvstore.store import LookupResult, TieredStore
from kvstore.tiers.base import TierError
from kvstore.tiers.obj import ObjTier

NS = "batch:ns"
MIB = 1 << 20


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def payload(i: int, size: int) -> bytes:
    return random.Random(i).randbytes(size)


def track_concurrency(store: TieredStore, expected: int) -> dict:
    """Count GetObject calls in flight at once. The first `expected` calls wait for each other
    before they are sent (a barrier, 5 s at most), so if the tier runs that many together they
    overlap for sure; if it runs fewer, the barrier breaks and those gets fail."""
    state = {"now": 0, "max": 0, "calls": 0}
    lock = threading.Lock()
    first_wave = threading.Barrier(expected, timeout=5)

    def before(**_):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
            state["calls"] += 1
            waits = state["calls"] <= expected
        if waits:
            first_wave.wait()

    def after(**_):
        with lock:
            state["now"] -= 1

    events = store.tier("obj")._client.meta.events
    events.register("before-call.s3.GetObject", before)
    events.register("after-call.s3.GetObject", after)
    return state


@pytest.mark.parametrize("inflight", [1, 4, 8])
def test_batches_of_mib_blocks_round_trip_exact_bytes(s3_bucket, inflight):
    endpoint, bucket = s3_bucket
    sizes = [MIB, 3 * MIB + 17, 1, MIB - 1, 64 << 10, 2 * MIB, MIB + 4099, 5, MIB, MIB]
    blocks = [(key(i), payload(i, size)) for i, size in enumerate(sizes)]
    with TieredStore([obj_tier(endpoint, bucket, key_prefix="par/", max_inflight=inflight)]) as store:
        assert store.put(NS, blocks) == len(blocks)
        concurrency = track_concurrency(store, inflight)
        asked = [key(100), *(key(i) for i in reversed(range(len(sizes)))), key(101)]
        assert store.get(NS, asked) == [None, *(value for _, value in reversed(blocks)), None]
        assert concurrency["max"] == inflight
        assert store.lookup(NS, [key(i) for i in range(len(sizes))]) == LookupResult(len(sizes), ["obj"] * len(sizes))
        assert store.clear(NS) == len(sizes)
    # Each object is the block's frame, byte for byte.
    s3 = s3_client(endpoint)
    tier = ObjTier(parse_tiers([obj_tier(endpoint, bucket, key_prefix="frame/")])[0])
    try:
        sealed = [(key(i), SealedBlock.seal(payload(i, MIB + i), NS, key(i))) for i in range(3)]
        tier.put(NS, sealed)
        for k, block in sealed:
            body = s3.get_object(Bucket=bucket, Key=f"frame/batch%3Ans/{k.hex()}")["Body"].read()
            assert body == block.frame()
        for (k, block), back in zip(sealed, tier.get(NS, [k for k, _ in sealed])):
            assert back.intact(NS, k) and back.payload == block.payload and type(back.payload) is bytes
    finally:
        tier.close()


def test_truncated_and_tiny_objects_are_not_intact(s3_bucket):
    endpoint, bucket = s3_bucket
    s3 = s3_client(endpoint)
    with TieredStore([obj_tier(endpoint, bucket, key_prefix="cut/")]) as store:
        store.put(NS, [(key(i), payload(i, MIB)) for i in range(3)])
        name = f"cut/batch%3Ans/{key(0).hex()}"
        frame = s3.get_object(Bucket=bucket, Key=name)["Body"].read()
        s3.put_object(Bucket=bucket, Key=name, Body=frame[:-1])
        s3.put_object(Bucket=bucket, Key=f"cut/batch%3Ans/{key(1).hex()}", Body=frame[:10])
        assert store.get(NS, [key(0), key(1), key(2)]) == [None, None, payload(2, MIB)]
        assert store.lookup(NS, [key(0), key(1), key(2)]).num_hits == 0   # both bad copies deleted


def test_endpoint_stopped_with_a_batch_in_flight():
    endpoint, stop = start_moto()
    make_bucket(endpoint, "midbatch")
    blocks = [(key(i), payload(i, MIB)) for i in range(12)]
    with TieredStore([obj_tier(endpoint, "midbatch", max_inflight=4, read_timeout_s=2)]) as store:
        assert store.put(NS, blocks) == len(blocks)
        calls = itertools.count(1)

        def stop_on_the_fifth_call(**_):
            if next(calls) == 5:   # itertools.count is atomic under the GIL
                stop()

        store.tier("obj")._client.meta.events.register("before-call.s3.GetObject", stop_on_the_fifth_call)
        started = time.perf_counter()
        got = store.get(NS, [k for k, _ in blocks])
        # Bounded by the stop itself (moto's server takes up to ~1 s to shut down) and by one read_timeout_s
        # for a request that was in flight on a connection the server dropped: 3.4-4.2 s measured.
        assert time.perf_counter() - started < 8
        # Requests already answered may have landed, but a failed batch is all misses, never wrong bytes.
        assert got == [None] * len(blocks)
        assert store.health() == {"obj": False}


def test_endpoint_that_never_answers_times_out():
    """A listening socket that never replies: each request times out after read_timeout_s, all of
    a batch at once, and the batch is a TierError, not a hang."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        endpoint = f"127.0.0.1:{listener.getsockname()[1]}"
        cfg = parse_tiers([obj_tier(endpoint, "stalled", max_inflight=8, read_timeout_s=0.5, max_attempts=1)])[0]
        tier = ObjTier(cfg)
        try:
            started = time.perf_counter()
            with pytest.raises(TierError):
                tier.get(NS, [key(i) for i in range(8)])
            assert time.perf_counter() - started < 3
        finally:
            tier.close()
