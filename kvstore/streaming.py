"""Blocks on the wire: split a block into a BlockStart plus data chunks, and reassemble them.

Blocks are 256 KiB - 8 MiB; gRPC's default message limit is 4 MiB and large messages cost a full
extra copy in both protobuf runtimes. So every block travels as a BlockStart (key, size, checksum,
expires_at, first chunk) followed by `data` messages of at most CHUNK_BYTES. Both the Put (client ->
daemon) and the Get (daemon -> client) streams use this framing. A block on the wire is a
`SealedBlock`: its checksum is the one the store keeps (kvstore.checksum), sent as is, and the
receiver verifies it against the namespace and key it asked for.

A stream is paced by its peer, and each one holds a daemon RPC thread while it waits: `IdleWatchdog`
cancels a stream whose peer has sent nothing (Put) or read nothing (Get) for `idle_s`, so a client
that opens streams and goes quiet cannot keep the daemon's threads. When the daemon stops, the same
watchdog ends the streams still running past the grace period (`drain`) at their next message, so
the handler answers UNAVAILABLE "shutting down" itself.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator

import grpc

from kvstore.checksum import SealedBlock
from kvstore.limits import LimitError
from kvstore.proto import kvstore_pb2 as pb

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


def block_messages(key: bytes, block: SealedBlock, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.BlockStart | bytes]:
    """A BlockStart carrying the first chunk, then the remaining chunks as bytes."""
    view = memoryview(block.payload)
    yield pb.BlockStart(key=key, size=len(view), checksum=block.checksum, expires_at=block.expires_at or 0.0,
                        data=bytes(view[:chunk_bytes]))
    for offset in range(chunk_bytes, len(view), chunk_bytes):
        yield bytes(view[offset : offset + chunk_bytes])


def framed_block(message_type, key: bytes, block: SealedBlock, chunk_bytes: int = CHUNK_BYTES) -> Iterator:
    """`block_messages` wrapped in a stream's message type (PutRequest, GetResponse): its `block`
    field for the BlockStart, its `data` field for each further chunk."""
    for part in block_messages(key, block, chunk_bytes):
        yield message_type(block=part) if isinstance(part, pb.BlockStart) else message_type(data=part)


class BlockAssembler:
    """Reassembles blocks from a stream of BlockStart / data messages, in order.

    `start()` and `data()` return `(key, block)` when they complete a block, else None; the block
    is as the sender declared it (the caller checks `block.intact(namespace, key)`). Framing
    violations raise LimitError (the sender broke the protocol: INVALID_ARGUMENT).
    """

    def __init__(self, max_block_bytes: int):
        self._max_block_bytes = max_block_bytes
        self._start: pb.BlockStart | None = None
        self._chunks: list[bytes] = []
        self._received = 0
        self.blocks_started = 0

    @property
    def in_block(self) -> bool:
        return self._start is not None

    def check_between_blocks(self) -> None:
        """Raise LimitError if a block is still being received (a new one may not begin)."""
        if self._start is not None:
            raise LimitError(f"blocks[{self.blocks_started - 1}]: a new block began before its "
                             f"{self._start.size} bytes arrived (got {self._received})")

    def start(self, start: pb.BlockStart) -> tuple[bytes, SealedBlock] | None:
        self.check_between_blocks()
        if start.size > self._max_block_bytes:
            raise LimitError(f"blocks[{self.blocks_started}]: {start.size} bytes, the limit "
                             f"(max_message_bytes) is {self._max_block_bytes}")
        self.blocks_started += 1
        self._start, self._chunks, self._received = start, [], 0
        return self.data(start.data)

    def data(self, chunk: bytes) -> tuple[bytes, SealedBlock] | None:
        if self._start is None:
            raise LimitError("data: a chunk arrived outside any block (send a BlockStart first)")
        self._received += len(chunk)
        if self._received > self._start.size:
            raise LimitError(f"blocks[{self.blocks_started - 1}]: more data than its declared "
                             f"size of {self._start.size} bytes")
        if chunk:
            self._chunks.append(chunk)
        if self._received < self._start.size:
            return None
        start, self._start = self._start, None
        payload = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks = []
        return start.key, SealedBlock(payload, start.checksum, start.size, start.expires_at or None)

    def finish(self) -> None:
        """Call at end of stream: a block cut short is a protocol error."""
        if self._start is not None:
            raise LimitError(f"blocks[{self.blocks_started - 1}]: the stream ended after {self._received} "
                             f"of {self._start.size} bytes")


class StreamIdle(Exception):
    """The watchdog cut this stream: its peer was silent for longer than the idle timeout."""


class StreamDraining(Exception):
    """The daemon is stopping and this stream ran past the grace period."""

    def __init__(self) -> None:
        super().__init__("shutting down")


class _Wait:
    """One stream waiting on its peer since `since` (monotonic seconds)."""

    __slots__ = ("context", "since", "cut")

    def __init__(self, context: grpc.ServicerContext):
        self.context = context
        self.since = time.monotonic()
        self.cut = False


class IdleWatchdog:
    """Cancels streams that wait on their peer for longer than `idle_s` (stream_idle_timeout_s).

    Only time spent waiting on the peer counts (the next request message, or the transport taking a
    response message); the daemon's own work between messages (a slow tier) does not. One thread
    checks every stream a few times per `idle_s`; a cut stream's call is cancelled, which wakes its
    handler thread, and the handler sees StreamIdle.
    """

    def __init__(self, idle_s: float):
        self.idle_s = idle_s
        self._waits: set[_Wait] = set()
        self._lock = threading.Lock()
        self._drain_at: float | None = None
        self.drained = 0   # streams ended by `drain`
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvstore-idle-streams", daemon=True)
        self._thread.start()

    def incoming(self, context: grpc.ServicerContext, messages: Iterable) -> Iterator:
        """`messages` (a request stream), cut when the next one takes longer than idle_s to arrive."""
        messages = iter(messages)
        while True:
            with self._waiting(context) as wait:
                try:
                    message = next(messages)
                except StopIteration:
                    return
                except grpc.RpcError:
                    if wait.cut:
                        raise StreamIdle(f"the stream sent nothing for {self.idle_s:g} s "
                                         f"(stream_idle_timeout_s); it was cancelled") from None
                    # gRPC cancelled the calls left when the grace ran out: the end of a drain, no error.
                    self._check_drain()
                    raise
            self._check_drain()
            yield message

    def outgoing(self, context: grpc.ServicerContext, messages: Iterable) -> Iterator:
        """`messages` (a response stream), cut when the peer takes longer than idle_s to take one."""
        for message in messages:
            self._check_drain()
            with self._waiting(context):
                yield message

    def drain(self, deadline: float) -> None:
        """Streams still running at `deadline` (monotonic seconds) end at their next message (or when
        gRPC cancels them) with StreamDraining."""
        self._drain_at = deadline

    def _check_drain(self) -> None:
        drain_at = self._drain_at
        if drain_at is not None and time.monotonic() >= drain_at:
            with self._lock:
                self.drained += 1
            raise StreamDraining() from None

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    @contextlib.contextmanager
    def _waiting(self, context: grpc.ServicerContext) -> Iterator[_Wait]:
        wait = _Wait(context)
        with self._lock:
            self._waits.add(wait)
        try:
            yield wait
        finally:
            with self._lock:
                self._waits.discard(wait)

    def _run(self) -> None:
        while not self._stopping.wait(min(1.0, self.idle_s / 4)):
            oldest = time.monotonic() - self.idle_s
            with self._lock:
                late = {wait for wait in self._waits if wait.since <= oldest}
                self._waits -= late
            for wait in late:
                wait.cut = True
                log.warning("cancelled a stream from %s: its peer was idle for %g s (stream_idle_timeout_s)",
                            wait.context.peer(), self.idle_s)
                wait.context.cancel()
