"""The same-host shared-memory path: exact bytes through every tier, checksums, bounds, sessions, cleanup."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from fixtures_services import obj_tier
from kvstore.checksum import block_checksum
from kvstore.client import KVStoreClient, RetryPolicy
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.shm_client import ShmTransport
from service_daemon import NS, key, payload, running_daemon

SHM = Path("/dev/shm")
SLOT = 1 << 20
TOKEN = "tok-shm-7d2a"


pytestmark = pytest.mark.usefixtures("no_shm_leftovers")  # every test leaves /dev/shm as it found it


def _rpcs(method: str, code: str = "OK") -> float:
    return REGISTRY.get_sample_value("kvstore_rpcs_total", {"method": method, "code": code}) or 0.0


def _wait(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


class RawSegment:
    """A segment file the test controls by hand (the client's own segments are unlinked once attached)."""

    def __init__(self, size: int):
        self.name = f"tierkv-test-{secrets.token_hex(6)}"
        self.path = SHM / self.name
        self.size = size
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(self.fd, size)

    def write(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


@pytest.fixture
def raw_segment():
    segment = RawSegment(4 * SLOT)
    yield segment
    segment.close()


def _stub(url: str) -> tuple[grpc.Channel, pb_grpc.KVStoreStub]:
    channel = grpc.insecure_channel(url.removeprefix("grpc://"))
    return channel, pb_grpc.KVStoreStub(channel)


def _attach(stub, segment: RawSegment, metadata=()):
    call = stub.AttachShm(pb.AttachShmRequest(name=segment.name, size=segment.size), metadata=metadata)
    return call, next(call).session_id


def _status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def _put_request(session_id: str, blocks: list[tuple[bytes, int, int, int]]) -> pb.PutShmRequest:
    return pb.PutShmRequest(session_id=session_id, header=pb.PutHeader(namespace=NS),
                            blocks=[pb.ShmBlock(key=k, offset=o, length=n, checksum=c) for k, o, n, c in blocks])


@pytest.mark.parametrize("tier", ["memory", "redis", "obj"])
def test_bytes_round_trip_exactly_through_shm_for_every_tier(tier, redis_url, s3_bucket):
    tiers = {"memory": {"type": "memory", "bytes": "64MiB"},
             "redis": {"type": "redis", "url": redis_url, "key_prefix": f"shm-{secrets.token_hex(4)}:"},
             "obj": obj_tier(*s3_bucket)}
    blocks = [(key(i), payload(i, size)) for i, size in enumerate([1, 4096, SLOT - 7, SLOT, 300_001, 65_536] * 2)]
    with running_daemon([tiers[tier]], promote_on_hit=False) as (_, url), \
            KVStoreClient(url, shm=True, shm_slot_bytes=SLOT, shm_slots=4) as client:
        assert client.shm is not None
        payload_puts, payload_gets = _rpcs("Put"), _rpcs("Get")
        assert client.put(NS, blocks, tiers=[tier]) == len(blocks)   # 12 blocks through 4 slots: 3 windows
        got = client.get(NS, [k for k, _ in blocks] + [key(999)])
        assert got == [p for _, p in blocks] + [None]
        assert (_rpcs("Put"), _rpcs("Get")) == (payload_puts, payload_gets)   # nothing took the payload path
        assert _rpcs("PutShm") > 0 and _rpcs("GetShm") > 0
        assert client.stats()[NS][tier].blocks == len(blocks)


def test_blocks_larger_than_a_slot_take_the_payload_path():
    big = (key(1), payload(1, 3 * SLOT))
    with running_daemon() as (_, url), KVStoreClient(url, shm=True, shm_slot_bytes=SLOT, shm_slots=2) as client:
        payload_puts, payload_gets = _rpcs("Put"), _rpcs("Get")
        assert client.put(NS, [big]) == 1
        assert client.put(NS, [(key(2), b"small")]) == 1
        assert client.get(NS, [key(2), key(1)]) == [b"small", big[1]]
        assert (_rpcs("Put"), _rpcs("Get")) == (payload_puts + 1, payload_gets + 1)


def test_put_checksum_mismatch_is_data_loss_and_nothing_is_stored(raw_segment):
    with running_daemon() as (handle, url):
        channel, stub = _stub(url)
        call, session = _attach(stub, raw_segment)
        data = payload(7, 5000)
        raw_segment.write(SLOT, data)
        right = block_checksum(data, NS, key(7))
        for wrong in (right ^ 1, block_checksum(data, NS, key(8)), block_checksum(data, NS + "x", key(7))):
            code, details = _status(lambda: stub.PutShm(_put_request(session, [(key(7), SLOT, 5000, wrong)])))
            assert code == grpc.StatusCode.DATA_LOSS
            assert details.startswith("blocks[0]: checksum mismatch")
        assert handle.store.lookup(NS, [key(7)]).num_hits == 0
        assert stub.PutShm(_put_request(session, [(key(7), SLOT, 5000, right)])).stored == 1
        assert handle.store.get(NS, [key(7)]) == [data]
        call.cancel()
        channel.close()


def test_get_checksum_mismatch_in_the_segment_is_a_miss():
    """Bytes that change in the slot between the daemon's write and the client's read are caught."""

    class CorruptSlots(grpc.UnaryUnaryClientInterceptor):
        def __init__(self):
            self.segment = None

        def intercept_unary_unary(self, continuation, details, request):
            response = continuation(details, request)
            if details.method.endswith("/GetShm"):
                for slot in request.slots:
                    self.segment.buffer[slot.offset] ^= 0xFF
            return response

    data = [(key(i), payload(i, 10_000)) for i in range(3)]
    with running_daemon() as (handle, url):
        handle.store.put(NS, data)
        corrupt = CorruptSlots()
        channel = grpc.intercept_channel(grpc.insecure_channel(url.removeprefix("grpc://")), corrupt)
        transport = ShmTransport(pb_grpc.KVStoreStub(channel), (), 5.0, SLOT, 4,
                                 on_segment=lambda segment: setattr(corrupt, "segment", segment))
        assert transport.attach()
        assert transport.get(NS, [k for k, _ in data], timeout=5.0) == [None, None, None]
        transport.close()
        channel.close()
        with KVStoreClient(url, shm=True, shm_slot_bytes=SLOT) as client:   # untouched: exact bytes
            assert client.get(NS, [k for k, _ in data]) == [p for _, p in data]


@pytest.mark.parametrize("request_of", [
    lambda s, size: _put_request(s, [(key(1), size, 1, 0)]),                       # starts past the end
    lambda s, size: _put_request(s, [(key(1), size - 10, 11, 0)]),                 # runs past the end
    lambda s, size: _put_request(s, [(key(1), 2**64 - 1, 2, 0)]),                  # offset + length overflows
    lambda s, size: _put_request(s, [(key(1), 0, 16, 0), (key(2), 1, size, 0)]),    # the 2nd block is bad
    lambda s, size: pb.GetShmRequest(session_id=s, namespace=NS,
                                     slots=[pb.ShmSlot(key=key(1), offset=size - SLOT + 1, capacity=SLOT)]),
])
def test_out_of_bounds_handles_are_invalid_argument_and_the_daemon_keeps_serving(raw_segment, request_of):
    with running_daemon() as (handle, url):
        channel, stub = _stub(url)
        call, session = _attach(stub, raw_segment)
        request = request_of(session, raw_segment.size)
        method = stub.PutShm if isinstance(request, pb.PutShmRequest) else stub.GetShm
        code, details = _status(lambda: method(request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "outside the 4194304-byte segment" in details
        assert handle.store.lookup(NS, [key(1)]).num_hits == 0
        # The same session still works, and so does everyone else.
        raw_segment.write(0, b"fine")
        assert stub.PutShm(_put_request(session, [(key(3), 0, 4, block_checksum(b"fine", NS, key(3)))])).stored == 1
        with KVStoreClient(url, shm=True, shm_slot_bytes=SLOT) as client:
            assert client.get(NS, [key(3)]) == [b"fine"]
        call.cancel()
        channel.close()


def test_a_segment_truncated_after_attach_cannot_crash_the_daemon(raw_segment):
    with running_daemon() as (handle, url):
        channel, stub = _stub(url)
        call, session = _attach(stub, raw_segment)
        os.ftruncate(raw_segment.fd, SLOT)
        data = payload(1, 100)
        code, details = _status(lambda: stub.PutShm(_put_request(session, [(key(1), 2 * SLOT, 100,
                                                                            block_checksum(data, NS, key(1)))])))
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT,
                                   f"blocks[0]: the segment holds only {SLOT} bytes (it was truncated after attaching)")
        handle.store.put(NS, [(key(2), data)])
        reply = stub.GetShm(pb.GetShmRequest(session_id=session, namespace=NS,
                                             slots=[pb.ShmSlot(key=key(2), offset=2 * SLOT, capacity=SLOT)]))
        assert reply.results[0].hit   # a write past the end regrows the file: no SIGBUS either way
        assert raw_segment.read(2 * SLOT, 100) == data
        assert stub.Stats(pb.StatsRequest()).tiers[0].up
        call.cancel()
        channel.close()


@pytest.mark.parametrize("name, size, code, message", [
    ("tierkv-../../etc/passwd", 4 * SLOT, grpc.StatusCode.INVALID_ARGUMENT, "name: expected 'tierkv-'"),
    ("/dev/shm/tierkv-x", 4 * SLOT, grpc.StatusCode.INVALID_ARGUMENT, "name: expected 'tierkv-'"),
    ("other-name", 4 * SLOT, grpc.StatusCode.INVALID_ARGUMENT, "name: expected 'tierkv-'"),
    ("tierkv-" + "a" * 65, 4 * SLOT, grpc.StatusCode.INVALID_ARGUMENT, "name: expected 'tierkv-'"),
    ("tierkv-does-not-exist", 4 * SLOT, grpc.StatusCode.FAILED_PRECONDITION, "cannot open segment"),
    (None, 4 * SLOT + 1, grpc.StatusCode.INVALID_ARGUMENT, "is not a 4194305-byte regular file"),
])
def test_bad_attach_requests_are_refused(raw_segment, name, size, code, message):
    with running_daemon() as (handle, url):
        channel, stub = _stub(url)
        request = pb.AttachShmRequest(name=raw_segment.name if name is None else name, size=size)
        got_code, details = _status(lambda: next(stub.AttachShm(request)))
        assert got_code == code and message in details
        assert handle.shm.count == 0
        channel.close()


def test_unknown_session_is_failed_precondition(raw_segment):
    with running_daemon() as (_, url):
        channel, stub = _stub(url)
        code, details = _status(lambda: stub.PutShm(_put_request("0" * 32, [(key(1), 0, 1, 0)])))
        assert (code, details) == (grpc.StatusCode.FAILED_PRECONDITION,
                                   "session_id: unknown shm session (it ended; attach again)")
        channel.close()


def test_shm_rpcs_need_the_token(raw_segment, monkeypatch):
    monkeypatch.setenv("KVSTORE_SHM_TOKEN", TOKEN)
    with running_daemon(auth_token_env="KVSTORE_SHM_TOKEN") as (handle, url):
        channel, stub = _stub(url)
        code, _ = _status(lambda: next(stub.AttachShm(pb.AttachShmRequest(name=raw_segment.name, size=raw_segment.size))))
        assert code == grpc.StatusCode.UNAUTHENTICATED and handle.shm.count == 0
        call, session = _attach(stub, raw_segment, metadata=(("authorization", f"Bearer {TOKEN}"),))
        code, _ = _status(lambda: stub.PutShm(_put_request(session, [(key(1), 0, 1, 0)])))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        call.cancel()
        channel.close()
        with KVStoreClient(url, token=TOKEN, shm=True, shm_slot_bytes=SLOT) as client:
            assert client.shm is not None
            assert client.put(NS, [(key(1), b"abc")]) == 1 and client.get(NS, [key(1)]) == [b"abc"]


def test_daemon_with_shm_off_refuses_and_the_client_falls_back_to_payloads():
    with running_daemon(shm=False) as (handle, url), KVStoreClient(url, shm=True, shm_slot_bytes=SLOT) as client:
        assert client.shm is None
        assert "shm: false" in client.shm_error
        payload_puts = _rpcs("Put")
        assert client.put(NS, [(key(1), b"via payload")]) == 1
        assert client.get(NS, [key(1)]) == [b"via payload"]
        assert _rpcs("Put") == payload_puts + 1 and handle.shm.count == 0


def test_auto_uses_shm_only_for_loopback_urls():
    with running_daemon() as (_, url):
        with KVStoreClient(url, shm="auto") as client:
            assert client.shm is not None
        with KVStoreClient(url, shm=False) as client:
            assert client.shm is None


def test_sessions_end_with_the_client_close_its_death_and_the_daemon():
    with running_daemon() as (handle, url):
        client = KVStoreClient(url, shm=True, shm_slot_bytes=SLOT, retry=RetryPolicy(attempts=1))
        assert handle.shm.count == 1
        client.close()
        _wait(lambda: handle.shm.count == 0, "closing the client ends its session")

        script = (f"import time; from kvstore.client import KVStoreClient\n"
                  f"c = KVStoreClient({url!r}, shm=True, shm_slot_bytes={SLOT})\n"
                  f"assert c.shm is not None; print('attached', flush=True); time.sleep(60)")
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        assert proc.stdout.readline().strip() == "attached"
        assert handle.shm.count == 1
        proc.kill()
        proc.wait()
        _wait(lambda: handle.shm.count == 0, "a killed client's session ends with its connection")

        client = KVStoreClient(url, shm=True, shm_slot_bytes=SLOT, retry=RetryPolicy(attempts=1))
        assert client.shm is not None
    started = time.monotonic()
    _wait(lambda: client.shm is None, "the client sees its session end when the daemon stops")
    assert time.monotonic() - started < 5
    client.close()


def test_session_limit_is_resource_exhausted_then_payloads():
    with running_daemon(shm_max_sessions=1) as (handle, url):
        with KVStoreClient(url, shm=True, shm_slot_bytes=SLOT) as first, \
                KVStoreClient(url, shm=True, shm_slot_bytes=SLOT) as second:
            assert first.shm is not None and second.shm is None
            assert "RESOURCE_EXHAUSTED" in second.shm_error
            assert second.put(NS, [(key(1), b"x")]) == 1 and first.get(NS, [key(1)]) == [b"x"]


def test_bench_measures_shm_beside_payloads(tmp_path, capsys):
    from kvstore.cli import main

    out = tmp_path / "bench.json"
    with running_daemon(promote_on_hit=False) as (_, url):
        assert main(["bench", "--url", url, "--shm", "--block-sizes", "64KiB,1MiB", "--blocks", "4", "--batch", "2",
                     "--json", str(out)]) == 0
    rows = [(r["mode"], r["tier"], r["block_bytes"], r["bad_blocks"]) for r in json.loads(out.read_text())]
    assert rows == [("daemon", "memory", 65536, 0), ("daemon-shm", "memory", 65536, 0),
                    ("daemon", "memory", 1 << 20, 0), ("daemon-shm", "memory", 1 << 20, 0)]
    assert "| daemon-shm | memory | 1 MiB | 4 x 2 |" in capsys.readouterr().out
    with running_daemon(shm=False) as (_, url):
        assert main(["bench", "--url", url, "--shm", "--block-sizes", "64KiB", "--blocks", "2"]) == 2
    assert "--shm: the daemon refused shared memory (AttachShm: FAILED_PRECONDITION" in capsys.readouterr().err
    assert main(["bench", "--shm", "--block-sizes", "64KiB", "--blocks", "2"]) == 2
    assert "--shm measures the shared-memory path to a daemon: give --url" in capsys.readouterr().err
