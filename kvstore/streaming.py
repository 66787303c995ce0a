"""Blocks on the wire: split a block into a BlockStart plus data chunks, and reassemble them.

Blocks are 256 KiB - 8 MiB; gRPC's default message limit is 4 MiB and large messages cost a full
extra copy in both protobuf runtimes. So every block travels as a BlockStart (key, size, checksum,
expires_at, first chunk) followed by `data` messages of at most CHUNK_BYTES. Both the Put (client ->
daemon) and the Get (daemon -> client) streams use this framing. A block on the wire is a
`SealedBlock`: its checksum is the one the store keeps (kvstore.checksum), sent as is, and the
receiver verifies it against the namespace and key it asked for.
"""

from __future__ import annotations

from collections.abc import Iterator

from kvstore.checksum import SealedBlock
from kvstore.limits import LimitError
from kvstore.proto import kvstore_pb2 as pb

CHUNK_BYTES = 1 << 20


def block_messages(key: bytes, block: SealedBlock, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.BlockStart | bytes]:
    """A BlockStart carrying the first chunk, then the remaining chunks as bytes."""
    view = memoryview(block.payload)
    yield pb.BlockStart(key=key, size=len(view), checksum=block.checksum, expires_at=block.expires_at or 0.0,
                        data=bytes(view[:chunk_bytes]))
    for offset in range(chunk_bytes, len(view), chunk_bytes):
        yield bytes(view[offset : offset + chunk_bytes])


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

    def start(self, start: pb.BlockStart) -> tuple[bytes, SealedBlock] | None:
        if self._start is not None:
            raise LimitError(f"blocks[{self.blocks_started - 1}]: a new block began before its "
                             f"{self._start.size} bytes arrived (got {self._received})")
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
