"""Property-based fuzzing of the kvstore daemon's gRPC API: a real daemon (with a slab, so the slab
calls run) on a loopback port, every KVStore method called with messages built from hypothesis
strategies, and raw bytes sent to every method path.

Property: every call ends OK or with a client-error status; never UNKNOWN, INTERNAL or a hang (each
call has a deadline, and DEADLINE_EXCEEDED fails the property); afterwards the health check answers
SERVING and a valid Put/Get round-trip returns the bytes.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import example, given
from hypothesis import strategies as st

from fuzz_common import count, fuzz_settings, outcome
from kvstore.client import KVStoreClient
from kvstore.config import MAX_TTL_S
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.server import SERVICE_NAME
from tests.kvstore.service_daemon import running_daemon

SLOT = 64 << 10
CALL_TIMEOUT_S = 15.0
CLIENT_ERRORS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.ALREADY_EXISTS}
UNARY = ["Lookup", "Delete", "Clear", "Stats", "AllocateSlots", "AcquireSlots", "CommitSlots", "ReleaseSlots"]
REQUEST_TYPES = {"Lookup": pb.LookupRequest, "Delete": pb.KeysRequest, "Clear": pb.ClearRequest,
                 "Stats": pb.StatsRequest, "AllocateSlots": pb.AllocateSlotsRequest,
                 "AcquireSlots": pb.AcquireSlotsRequest, "CommitSlots": pb.CommitSlotsRequest,
                 "ReleaseSlots": pb.ReleaseSlotsRequest, "Get": pb.GetRequest, "AttachSlab": pb.AttachSlabRequest}


class Daemon:
    """The daemon under test, a channel to it, and one attached slab session (its id and nonce)."""

    def __init__(self, handle, url: str):
        self.handle, self.url = handle, url
        self.address = f"127.0.0.1:{handle.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.KVStoreStub(self.channel)
        self.attach = self.stub.AttachSlab(pb.AttachSlabRequest())
        first = next(self.attach)
        self.session_id = first.session_id
        segment = Path("/dev/shm") / first.segment_name
        with open(segment, "rb") as f:
            f.seek(first.nonce_offset)
            self.nonce = f.read(first.nonce_len)
        self.num_slots = first.num_slots

    def close(self) -> None:
        self.attach.cancel()
        self.channel.close()


@pytest.fixture(scope="module")
def daemon():
    tiers = [{"type": "memory", "bytes": 8 * SLOT, "slot_bytes": SLOT},
             {"type": "memory", "name": "below", "bytes": "4MiB"}]
    with running_daemon(tiers, stream_idle_timeout_s=5.0) as (handle, url):
        d = Daemon(handle, url)
        try:
            yield d
            check_still_serving(d)
        finally:
            d.close()


def check_still_serving(d: Daemon) -> None:
    """The health check answers SERVING and a valid Put/Get round-trip returns the exact bytes."""
    health = health_pb2_grpc.HealthStub(d.channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                        timeout=CALL_TIMEOUT_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    key, data = os.urandom(16), os.urandom(3000)
    with KVStoreClient(d.url, timeout_s=CALL_TIMEOUT_S) as client:
        assert client.put("ns-fuzz-check", [(key, data)]) == 1
        assert client.get("ns-fuzz-check", [key]) == [data]


def expect_client_status(method: str, call) -> grpc.StatusCode:
    """Run `call()`; its status must be OK or a client error (never UNKNOWN/INTERNAL, never a hang);
    request bytes that are not the method's message included (INVALID_ARGUMENT)."""
    count(f"grpc.{method}")
    try:
        call()
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
        assert code in CLIENT_ERRORS, f"{method}: {code.name}: {error.details()}"
    outcome("grpc", code.name)
    return code


# ---- strategies ----------------------------------------------------------------------------------

NAMESPACE = st.one_of(st.just("ns-fuzz"), st.sampled_from(["", "ns\n", "ns/x", "n s", "ä", "ns\x00", "a" * 128,
                                                            "a" * 129, "\u202e", ".", "..", ":-_", "\U0001F600" * 40]),
                      st.text(max_size=20), st.text(st.characters(codec="ascii"), min_size=1, max_size=200))
KEY = st.one_of(st.binary(min_size=1, max_size=20), st.binary(max_size=80),
                st.sampled_from([b"", b"k" * 64, b"k" * 65, b"\x00", b"\xff" * 16]))
KEYS = st.one_of(st.lists(KEY, max_size=6),
                 st.sampled_from([4096, 4097, 50_000]).map(lambda n: [n.to_bytes(3, "big") + b"k"] * n))
DOUBLE = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, -1.0, 1e-300, 5e-324, MAX_TTL_S, MAX_TTL_S * 1.0000001, 1e300,
                                    math.nan, math.inf, -math.inf]))
EXPIRES_AT = st.one_of(DOUBLE, st.floats(-100, 100).map(lambda dt: time.time() + dt))
UINT32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 7, 8, 9, 4096, 4097, 2**31, 2**32 - 1]))
UINT64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, SLOT, 64 << 20, (64 << 20) + 1, 2**63, 2**64 - 1]))
SFIXED64 = st.integers(-(2**63), 2**63 - 1)
TIER_NAMES = st.lists(st.one_of(st.sampled_from(["memory", "below", "redis", "", "MEMORY"]), st.text(max_size=10)),
                      max_size=3)


@st.composite
def slab_handle(draw, d: Daemon):
    kind = draw(st.sampled_from(["valid", "bad_nonce", "unknown", "empty"]))
    if kind == "valid":
        return pb.SlabHandle(session_id=d.session_id, nonce=d.nonce)
    if kind == "bad_nonce":
        return pb.SlabHandle(session_id=d.session_id, nonce=draw(st.binary(max_size=40)))
    if kind == "unknown":
        return pb.SlabHandle(session_id=draw(st.text(max_size=40)), nonce=draw(st.one_of(st.just(d.nonce),
                                                                                         st.binary(max_size=40))))
    return None


@st.composite
def put_header(draw):
    header = pb.PutHeader(namespace=draw(NAMESPACE), tiers=draw(TIER_NAMES))
    if draw(st.booleans()):
        header.ttl_s = draw(DOUBLE)
    return header


@st.composite
def slots(draw, d: Daemon):
    return draw(st.lists(st.one_of(st.integers(0, d.num_slots), UINT32), max_size=8))


@st.composite
def unary_request(draw, d: Daemon):
    method = draw(st.sampled_from(UNARY))
    session = draw(slab_handle(d))
    if method in ("Lookup", "Delete"):
        request = REQUEST_TYPES[method](namespace=draw(NAMESPACE), keys=draw(KEYS))
    elif method == "Clear":
        request = pb.ClearRequest(namespace=draw(NAMESPACE))
    elif method == "Stats":
        request = pb.StatsRequest()
    elif method == "AllocateSlots":
        request = pb.AllocateSlotsRequest(session=session, count=draw(UINT32))
    elif method == "AcquireSlots":
        request = pb.AcquireSlotsRequest(session=session, namespace=draw(NAMESPACE), keys=draw(KEYS))
    elif method == "CommitSlots":
        blocks = draw(st.lists(st.builds(pb.CommittedSlot, key=KEY, slot=st.one_of(st.integers(0, d.num_slots), UINT32),
                                         checksum=SFIXED64, expires_at=EXPIRES_AT), max_size=5))
        request = pb.CommitSlotsRequest(session=session, header=draw(put_header()), blocks=blocks)
    else:
        request = pb.ReleaseSlotsRequest(session=session, slots=draw(slots(d)))
    return method, request


@st.composite
def put_stream(draw) -> list[pb.PutRequest]:
    """A Put stream: usually a header first, then BlockStarts (random sizes, checksums, expiries) and data."""
    messages = []
    if draw(st.integers(0, 9)):
        messages.append(pb.PutRequest(header=draw(put_header())))
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["block", "block", "data", "header"]))
        if kind == "block":
            data = draw(st.binary(max_size=300))
            size = draw(st.one_of(st.just(len(data)), st.integers(0, 600), UINT64))
            block = pb.BlockStart(key=draw(KEY), size=size, checksum=draw(SFIXED64), expires_at=draw(EXPIRES_AT),
                                  data=data)
            messages.append(pb.PutRequest(block=block))
        elif kind == "data":
            messages.append(pb.PutRequest(data=draw(st.binary(max_size=300))))
        else:
            messages.append(pb.PutRequest(header=draw(put_header())))
    return messages


RAW = st.one_of(st.binary(max_size=200), st.sampled_from([b"\x0a", b"\x0a\xff\xff\xff\xff\x0f", b"\xff" * 10,
                                                            b"\x12\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
                                                            b"\x08" + b"\xff" * 9 + b"\x01", b"\x0b", b"\x0c",
                                                            b"\x0a\x03ns\xc3", b"\x0a\x02\xc3\x28"]))


# ---- the properties ------------------------------------------------------------------------------

@fuzz_settings(400)
@given(data=st.data())
def test_grpc_unary_methods_fuzz(daemon, data):
    method, request = data.draw(unary_request(daemon))
    expect_client_status(method, lambda: getattr(daemon.stub, method)(request, timeout=CALL_TIMEOUT_S))


@fuzz_settings(150)
@given(messages=put_stream())
def test_grpc_put_stream_fuzz(daemon, messages):
    expect_client_status("Put", lambda: daemon.stub.Put(iter(messages), timeout=CALL_TIMEOUT_S))


@fuzz_settings(150)
@given(method=st.sampled_from(["Get", "AttachSlab"]), namespace=NAMESPACE, keys=KEYS)
def test_grpc_server_streaming_methods_fuzz(daemon, method, namespace, keys):
    if method == "Get":
        expect_client_status("Get", lambda: list(daemon.stub.Get(pb.GetRequest(namespace=namespace, keys=keys),
                                                                 timeout=CALL_TIMEOUT_S)))
        return

    def attach_and_leave():
        call = daemon.stub.AttachSlab(pb.AttachSlabRequest(), timeout=CALL_TIMEOUT_S)
        try:
            assert next(call).session_id
        finally:
            call.cancel()

    expect_client_status("AttachSlab", attach_and_leave)


@fuzz_settings(300)
@given(method=st.sampled_from([*UNARY, "Get", "AttachSlab", "Put"]), raw=RAW,
       more=st.lists(RAW, max_size=3))
@example(method="Lookup", raw=b"\xff", more=[])
@example(method="Put", raw=b"\xff", more=[])
def test_grpc_raw_bytes_fuzz(daemon, method, raw, more):
    """Bytes that may not parse as the method's request message at all."""
    path = f"/{SERVICE_NAME}/{method}"
    if method == "Put":
        call = daemon.channel.stream_unary(path, request_serializer=None, response_deserializer=None)
        expect_client_status("raw.Put", lambda: call(iter([raw, *more]), timeout=CALL_TIMEOUT_S))
        return
    if method in ("Get", "AttachSlab"):
        call = daemon.channel.unary_stream(path, request_serializer=None, response_deserializer=None)

        def first_messages():
            # A Get stream ends by itself; an AttachSlab stream stays open after its one message.
            stream = call(raw, timeout=CALL_TIMEOUT_S)
            try:
                for _ in zip(range(1 if method == "AttachSlab" else 10_000), stream):
                    pass
            finally:
                stream.cancel()

        expect_client_status(f"raw.{method}", first_messages)
    else:
        call = daemon.channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        expect_client_status(f"raw.{method}", lambda: call(raw, timeout=CALL_TIMEOUT_S))


# ---- what the fuzzing found (regression tests; see tests/fuzz/test_fuzz_regressions.py) ------------

def test_grpc_unparsable_unary_request_is_invalid_argument(daemon):
    call = daemon.channel.unary_unary(f"/{SERVICE_NAME}/Lookup", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as raised:
        call(b"\xff", timeout=CALL_TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()


def test_grpc_unparsable_put_message_is_invalid_argument(daemon):
    call = daemon.channel.stream_unary(f"/{SERVICE_NAME}/Put", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as raised:
        call(iter([b"\xff"]), timeout=CALL_TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
