"""The clients of `kvstore soak`: one thread each, behaving well or badly against the daemon.

* **good**: Puts random blocks under unique keys, reads each acknowledged block back later and
  compares every byte, then deletes it (so what it keeps stored stays within `window` blocks and the
  memory tier never has to evict an acknowledged block). A miss of an acknowledged block is a loss
  unless the daemon's memory tier evicted something since the Put was acknowledged.
* **stalled**: opens a Put and sends the header and then nothing; opens a Put, sends half of a
  block and then nothing (its bytes stay reserved in the daemon); opens a Get and never reads it.
  Each call waits until the daemon cuts it (stream_idle_timeout_s).
* **oversized**: a block declared larger than max_message_bytes; one message larger than the
  daemon's transport limit; a Lookup and a Get request larger than their methods' limits.
* **disconnecting**: cancels a Put in the middle of a block, cancels a Get after its first message,
  closes its channel in the middle of a Put.

Every call's final gRPC status is counted per kind of client (`Tally`); calls this process cancels
itself (a disconnecting client's own cancel aside) when the run stops are not counted.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np

from kvstore.client import KVStoreClient, KVStoreError, RetryPolicy, Target, open_channel
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.streaming import CHUNK_BYTES

log = logging.getLogger(__name__)

KINDS = ("good", "stalled", "oversized", "disconnecting")
# Deadline of a good client's call: far above any healthy call, so a stuck daemon shows as a status.
CALL_TIMEOUT_S = 30.0
# How long a good client keeps retrying a call the daemon turned away as busy (RESOURCE_EXHAUSTED,
# "retry later": stalled clients hold some of its max_concurrent_rpcs).
BUSY_RETRY_S = 30.0
# Pause between two abusive calls: on a shared host a tight loop of refusals would measure this
# process's CPU more than the daemon.
ABUSE_PAUSE_S = 0.05
# A Lookup/Get of this many 16-byte keys is about 720 KB, over the 311,808-byte request limit
# the default max_keys_per_call, max_key_bytes and max_namespace_len give those methods.
OVERSIZED_KEYS = 40_000
# A stalled Get asks for its block this many bytes' worth of times, more than any HTTP/2 window
# holds, so the daemon's stream must wait for the reader.
STALLED_GET_BYTES = 64 << 20


@dataclass
class Tally:
    """What every client did, counted under one lock."""

    statuses: dict[str, Counter] = field(default_factory=lambda: {kind: Counter() for kind in KINDS})
    puts: int = 0   # acknowledged Puts of good clients
    gets: int = 0   # Gets of good clients that answered
    bytes_put: int = 0
    bytes_got: int = 0
    blocks_verified: int = 0
    wrong_bytes: int = 0
    wrong_blocks: int = 0
    lost_blocks: int = 0
    misses_after_eviction: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def status(self, kind: str, code: grpc.StatusCode) -> None:
        with self._lock:
            self.statuses[kind][code.name] += 1

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


@dataclass(frozen=True)
class ClientSetup:
    """What every client of one run shares: where the daemon is, the run's limits, its tally and stop."""

    url: str
    namespace: str
    block_bytes: int
    batch: int
    window: int
    max_message_bytes: int
    # How long a stalled Get waits before reading: past the daemon's stream_idle_timeout_s and the
    # up to 1 s its watchdog takes to notice.
    stall_s: float
    tally: Tally
    stop: threading.Event
    # The daemon's memory-tier evictions: (the last polled count, a fresh count); None = unknown.
    evictions_polled: Callable[[], float | None]
    evictions_now: Callable[[], float | None]


def soak_key(client: int, seq: int) -> bytes:
    """A 16-byte key unique to (client, seq) within the run's namespace."""
    return struct.pack(">IQ4x", client, seq)


def wrong_bytes(expected: bytes, got: bytes | memoryview) -> int:
    """How many bytes of `got` differ from `expected` (a length difference counts as that many)."""
    common = min(len(expected), len(got))
    a = np.frombuffer(expected, np.uint8, common)
    b = np.frombuffer(got, np.uint8, common)
    return int(np.count_nonzero(a != b)) + abs(len(expected) - len(got))


def _busy_retried(setup: ClientSetup, kind: str, call: Callable[[], object]) -> tuple[bool, object]:
    """(succeeded, result) of `call`, retried while the daemon answers RESOURCE_EXHAUSTED; every
    attempt's status is counted under `kind`."""
    started = time.monotonic()
    delay = 0.05
    while True:
        try:
            result = call()
        except KVStoreError as error:
            setup.tally.status(kind, error.code)
            if error.code != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() - started > BUSY_RETRY_S:
                log.warning("%s client: %s", kind, error)
                return False, None
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 1.0)
            continue
        setup.tally.status(kind, grpc.StatusCode.OK)
        return True, result


def _client(setup: ClientSetup) -> KVStoreClient:
    # One attempt per call: every status the daemon answers is counted, and busy ones retried here.
    return KVStoreClient(setup.url, timeout_s=CALL_TIMEOUT_S, retry=RetryPolicy(attempts=1))


@dataclass
class _Acked:
    """A batch the daemon acknowledged: its keys, their bytes, and the eviction count then."""

    keys: list[bytes]
    payloads: list[bytes]
    evictions: float | None


class GoodClient:
    """Put, read back later, compare byte for byte, delete; see the module docstring."""

    def __init__(self, setup: ClientSetup, index: int):
        self.setup = setup
        self.index = index
        self._seq = itertools.count()
        self._held: deque[_Acked] = deque()

    def run(self) -> None:
        with _client(self.setup) as client:
            while not self.setup.stop.is_set():
                held_blocks = sum(len(batch.keys) for batch in self._held)
                if self._held and held_blocks + self.setup.batch > self.setup.window:
                    self._verify(client, self._held.popleft())
                self._put(client)
            while self._held:   # every acknowledged block is read back before the run ends
                self._verify(client, self._held.popleft())

    def _put(self, client: KVStoreClient) -> None:
        keys = [soak_key(self.index, next(self._seq)) for _ in range(self.setup.batch)]
        payloads = [os.urandom(self.setup.block_bytes) for _ in keys]
        ok, stored = _busy_retried(self.setup, "good",
                                   lambda: client.put(self.setup.namespace, list(zip(keys, payloads))))
        if ok and stored == len(keys):
            evictions = self.setup.evictions_polled()
            self.setup.tally.add(puts=1, bytes_put=len(keys) * self.setup.block_bytes)
            self._held.append(_Acked(keys, payloads, evictions))
        else:   # not acknowledged: whatever part of it was stored must not stay
            _busy_retried(self.setup, "good", lambda: client.delete(self.setup.namespace, keys))

    def _verify(self, client: KVStoreClient, batch: _Acked) -> None:
        ok, got = _busy_retried(self.setup, "good", lambda: client.get(self.setup.namespace, batch.keys))
        if not ok:
            return
        self.setup.tally.add(gets=1)
        for expected, block in zip(batch.payloads, got):
            if block is None:
                self._miss(batch)
                continue
            self.setup.tally.add(bytes_got=len(block), blocks_verified=1)
            if block != expected:
                bad = wrong_bytes(expected, block)
                log.error("good client %d: a block came back with %d wrong bytes", self.index, bad)
                self.setup.tally.add(wrong_bytes=bad, wrong_blocks=1)
        _busy_retried(self.setup, "good", lambda: client.delete(self.setup.namespace, batch.keys))

    def _miss(self, batch: _Acked) -> None:
        now = self.setup.evictions_now()
        # Lost unless the memory tier evicted something since the ack (unknown counts: a loss).
        if now is None or batch.evictions is None or now <= batch.evictions:
            log.error("good client %d: an acknowledged block is missing (no eviction since its Put)", self.index)
            self.setup.tally.add(lost_blocks=1)
        else:
            self.setup.tally.add(misses_after_eviction=1)


def _header(namespace: str) -> pb.PutRequest:
    return pb.PutRequest(header=pb.PutHeader(namespace=namespace))


def _wait_for_end(setup: ClientSetup, kind: str, call: grpc.Future) -> None:
    """Wait until the daemon ends `call` (its status is counted) or the run stops (cancelled, not counted)."""
    while not call.done():
        if setup.stop.wait(0.05):
            call.cancel()
            return
    setup.tally.status(kind, call.code())


class _AbusiveClient:
    """A client cycling through its `modes`, each one call on the client's own channel."""

    kind = ""

    def __init__(self, setup: ClientSetup, index: int):
        self.setup = setup
        self.index = index
        self.own_key = soak_key(index, 0)

    def modes(self) -> list[Callable[[pb_grpc.KVStoreStub], None]]:
        raise NotImplementedError

    def run(self) -> None:
        target = Target.parse(self.setup.url)
        with _client(self.setup) as client:
            # A block of its own, for the Gets it abuses (deleted at the end).
            _busy_retried(self.setup, self.kind, lambda: client.put(
                self.setup.namespace, [(self.own_key, os.urandom(self.setup.block_bytes))]))
            channel = open_channel(target)
            try:
                stub = pb_grpc.KVStoreStub(channel)
                for mode in itertools.cycle(self.modes()):
                    if self.setup.stop.wait(ABUSE_PAUSE_S):
                        break
                    mode(stub)
            finally:
                channel.close()
                _busy_retried(self.setup, self.kind, lambda: client.delete(self.setup.namespace, [self.own_key]))

    def _declared_block(self) -> int:
        """A block of two chunks that the daemon accepts (within max_message_bytes)."""
        return min(self.setup.max_message_bytes, max(2 * self.setup.block_bytes, 2))

    def _half_block(self, release: threading.Event) -> Iterator[pb.PutRequest]:
        size = self._declared_block()
        yield _header(self.setup.namespace)
        yield pb.PutRequest(block=pb.BlockStart(key=soak_key(self.index, 1), size=size, data=bytes(size // 2)))
        release.wait()


class StalledClient(_AbusiveClient):
    """Opens streams and then neither sends nor reads; see the module docstring."""

    kind = "stalled"

    def modes(self):
        return [self._put_header_only, self._put_half_block, self._get_unread]

    def _put_header_only(self, stub: pb_grpc.KVStoreStub) -> None:
        def requests(release: threading.Event) -> Iterator[pb.PutRequest]:
            yield _header(self.setup.namespace)
            release.wait()

        self._stall(lambda release: stub.Put.future(requests(release)))

    def _put_half_block(self, stub: pb_grpc.KVStoreStub) -> None:
        self._stall(lambda release: stub.Put.future(self._half_block(release)))

    def _get_unread(self, stub: pb_grpc.KVStoreStub) -> None:
        repeats = min(4096, max(1, STALLED_GET_BYTES // self.setup.block_bytes))
        call = stub.Get(pb.GetRequest(namespace=self.setup.namespace, keys=[self.own_key] * repeats))
        # A Get's status reaches its client only after the messages before it are read: wait past
        # the daemon's idle timeout, then read what arrived to learn how the daemon ended the call.
        if self.setup.stop.wait(self.setup.stall_s):
            call.cancel()
            return
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass   # its status is counted below
        self.setup.tally.status(self.kind, call.code())

    def _stall(self, start: Callable[[threading.Event], grpc.Future]) -> None:
        """Start a Put stream that goes quiet, and wait for the daemon to end it."""
        release = threading.Event()
        try:
            _wait_for_end(self.setup, self.kind, start(release))
        finally:
            release.set()


class OversizedClient(_AbusiveClient):
    """Sends what is over the daemon's limits; see the module docstring."""

    kind = "oversized"

    def __init__(self, setup: ClientSetup, index: int):
        super().__init__(setup, index)
        keys = [soak_key(index, seq) for seq in range(OVERSIZED_KEYS)]
        self._huge_lookup = pb.LookupRequest(namespace=setup.namespace, keys=keys)
        self._huge_get = pb.GetRequest(namespace=setup.namespace, keys=keys)

    def modes(self):
        return [self._block_over_limit, self._message_over_transport, self._lookup_over, self._get_over]

    def _block_over_limit(self, stub: pb_grpc.KVStoreStub) -> None:
        size = self.setup.max_message_bytes + 1
        start = pb.BlockStart(key=soak_key(self.index, 1), size=size, data=bytes(min(size, CHUNK_BYTES)))
        self._ended(lambda: stub.Put(iter([_header(self.setup.namespace), pb.PutRequest(block=start)]),
                                     timeout=CALL_TIMEOUT_S))

    def _message_over_transport(self, stub: pb_grpc.KVStoreStub) -> None:
        # One message past any receive limit of the daemon (a Put chunk and its framing, at most
        # max_message_bytes + 64 KiB): gRPC's own check.
        size = self.setup.max_message_bytes + (64 << 10) + 1
        start = pb.BlockStart(key=soak_key(self.index, 1), size=size, data=bytes(size))
        self._ended(lambda: stub.Put(iter([_header(self.setup.namespace), pb.PutRequest(block=start)]),
                                     timeout=CALL_TIMEOUT_S))

    def _lookup_over(self, stub: pb_grpc.KVStoreStub) -> None:
        self._ended(lambda: stub.Lookup(self._huge_lookup, timeout=CALL_TIMEOUT_S))

    def _get_over(self, stub: pb_grpc.KVStoreStub) -> None:
        self._ended(lambda: list(stub.Get(self._huge_get, timeout=CALL_TIMEOUT_S)))

    def _ended(self, call: Callable[[], object]) -> None:
        try:
            call()
        except grpc.RpcError as error:
            self.setup.tally.status(self.kind, error.code())
        else:
            self.setup.tally.status(self.kind, grpc.StatusCode.OK)


class DisconnectingClient(_AbusiveClient):
    """Walks away in the middle of streams; see the module docstring."""

    kind = "disconnecting"

    def modes(self):
        return [self._cancel_put, self._cancel_get, self._close_channel_in_put]

    def _cancel_put(self, stub: pb_grpc.KVStoreStub) -> None:
        self._put_then(stub, lambda call: call.cancel())

    def _close_channel_in_put(self, _stub: pb_grpc.KVStoreStub) -> None:
        channel = open_channel(Target.parse(self.setup.url))
        self._put_then(pb_grpc.KVStoreStub(channel), lambda _call: channel.close())

    def _put_then(self, stub: pb_grpc.KVStoreStub, disconnect: Callable[[grpc.Future], object]) -> None:
        release = threading.Event()
        call = stub.Put.future(self._half_block(release))
        time.sleep(random.uniform(0.02, 0.2))   # the daemon is receiving the block by now
        disconnect(call)
        release.set()
        self.setup.tally.status(self.kind, call.code())

    def _cancel_get(self, stub: pb_grpc.KVStoreStub) -> None:
        call = stub.Get(pb.GetRequest(namespace=self.setup.namespace, keys=[self.own_key] * 8),
                        timeout=CALL_TIMEOUT_S)
        try:
            next(call)
        except grpc.RpcError:
            pass   # refused before its first message: its status is counted below
        call.cancel()
        self.setup.tally.status(self.kind, call.code())


CLIENTS: dict[str, Callable[[ClientSetup, int], object]] = {
    "good": GoodClient, "stalled": StalledClient, "oversized": OversizedClient, "disconnecting": DisconnectingClient}
