"""Put bytes in flight: the daemon admits a block's bytes before it receives them, up to
max_inflight_put_bytes; a block that does not fit waits (inflight_put_wait_s), then is refused
with RESOURCE_EXHAUSTED."""

import threading
import time

import grpc
from prometheus_client import REGISTRY

from kvstore.checksum import SealedBlock
from kvstore.client import KVStoreClient
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.streaming import framed_block
from service_daemon import NS, key, payload, running_daemon

MIB = 1 << 20
CAP = 8 * MIB
BLOCK = 4 * MIB
PUTS = 12


def _slow_put(i: int, start: threading.Barrier):
    """A Put of one 4 MiB block in 1 MiB messages, 20 ms apart (so the streams overlap)."""
    start.wait()
    yield pb.PutRequest(header=pb.PutHeader(namespace=NS))
    for message in framed_block(pb.PutRequest, key(i), SealedBlock.seal(payload(i, BLOCK), NS, key(i)), MIB):
        yield message
        time.sleep(0.02)


def _gauge() -> float | None:
    return REGISTRY.get_sample_value("kvstore_inflight_put_bytes")


def _concurrent_puts(url: str) -> tuple[dict, list]:
    """PUTS slow Puts at once: each one's (code, stored count or details), and the gauge's samples."""
    channel = grpc.insecure_channel(url.removeprefix("grpc://"))
    stub = pb_grpc.KVStoreStub(channel)
    start, outcomes, peaks, done = threading.Barrier(PUTS), {}, [], threading.Event()

    def put(i: int) -> None:
        try:
            outcomes[i] = ("OK", stub.Put(_slow_put(i, start), timeout=30).stored)
        except grpc.RpcError as error:
            outcomes[i] = (error.code().name, error.details())

    def watch() -> None:
        while not done.is_set():
            peaks.append(_gauge())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=put, args=(i,)) for i in range(PUTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    watcher.join()
    channel.close()
    return outcomes, peaks


def test_puts_past_the_inflight_cap_wait_their_turn():
    tiers = [{"type": "memory", "bytes": "64MiB"}]
    with running_daemon(tiers, max_message_bytes=BLOCK, max_inflight_put_bytes=CAP) as (_, url), \
            KVStoreClient(url) as client:
        outcomes, peaks = _concurrent_puts(url)
        assert outcomes == {i: ("OK", 1) for i in range(PUTS)}
        assert client.get(NS, [key(i) for i in range(PUTS)]) == [payload(i, BLOCK) for i in range(PUTS)]
        assert max(peaks) == CAP
        assert _gauge() == 0


def test_puts_past_the_inflight_cap_are_refused_after_the_wait():
    tiers = [{"type": "memory", "bytes": "64MiB"}]
    with running_daemon(tiers, max_message_bytes=BLOCK, max_inflight_put_bytes=CAP, inflight_put_wait_s=0) \
            as (_, url), KVStoreClient(url) as client:
        outcomes, peaks = _concurrent_puts(url)
        stored = sorted(i for i, (code, _) in outcomes.items() if code == "OK")
        refused = sorted(i for i, (code, _) in outcomes.items() if code != "OK")
        assert stored and refused
        assert all(outcomes[i] == ("OK", 1) for i in stored)
        for i in refused:
            assert outcomes[i] == ("RESOURCE_EXHAUSTED",
                                   f"blocks[0]: {BLOCK} bytes did not fit the daemon's bytes of Put streams in flight "
                                   f"({CAP}, max_inflight_put_bytes) within 0 s (inflight_put_wait_s or the call's "
                                   f"deadline); 0 earlier blocks were stored, retry the rest later")
        assert client.get(NS, [key(i) for i in stored]) == [payload(i, BLOCK) for i in stored]
        assert client.get(NS, [key(i) for i in refused]) == [None] * len(refused)
        assert 0 < max(peaks) <= CAP
        assert _gauge() == 0
