"""Self-verifying block values: a payload, its block checksum, and the frame that carries both.

Every tier stores a block so that a read can prove the bytes are the ones that were put *under that
namespace and key*. The checksum is `block_checksum` (below): fast 64-bit chunk sums of the payload
XOR a tag of (namespace, key, length, expires_at). So a valid value copied to another key (Redis
SET, S3 copy_object, another namespace) or given another expiry fails its check on read, exactly like
flipped bits do. The engine computes the same function on the GPU, so a block is checksummed once,
where its bytes are, and that value travels unchanged through every tier and back; nothing on the
way recomputes it (promotion, write-down), and rebinding an expiry swaps only the tag.

The memory tier keeps a `SealedBlock` object (the payload bytes are stored once and handed back as
is); Redis and S3 store the frame `header || payload`:

    magic "TKVB" | version u8 = 2 | algorithm u8 = 2 | reserved u16 | length u64 | checksum i64 | expires_at f64

`expires_at` is wall-clock seconds (0 = no expiry), so a TTL survives a block moving between tiers
and processes; it is covered by the checksum and must be finite and positive. Version 1 frames (a
CRC-32 of the payload alone) decode as not intact: a miss, deleted by the store.

Not a defence against forgery: anyone who can write to Redis or S3 can compute a valid frame.
It catches corruption, truncation and values in the wrong place.
"""

from __future__ import annotations

import hashlib
import math
import struct
import time
from dataclasses import dataclass

import numpy as np

MAGIC = b"TKVB"
VERSION = 2
ALGORITHM_BLOCKSUM = 2
_HEADER = struct.Struct("<4sBBHQqd")
HEADER_BYTES = _HEADER.size


def _valid_expiry(expires_at: float | None) -> bool:
    """Whether an absolute expiry can be stored: None (never), or finite wall-clock seconds > 0.
    (NaN would never compare as expired, and inf is "never" in disguise.)"""
    return expires_at is None or (math.isfinite(expires_at) and expires_at > 0)


@dataclass(frozen=True, slots=True)
class SealedBlock:
    """A payload, its block checksum (bound to a namespace, key and expiry) and its absolute expiry.

    The namespace and key are not stored in the block: they are where it is stored, and `intact`
    takes them from where it was read. `length` is what the header claimed: a frame whose header
    cannot be read decodes to a block with `length == -1`, so the caller treats it exactly like any
    other failed check.
    """

    payload: bytes
    checksum: int
    length: int
    expires_at: float | None = None

    @classmethod
    def seal(cls, payload: bytes | bytearray | memoryview, namespace: str, key: bytes,
             expires_at: float | None = None, *, checksum: int | None = None,
             borrow: bool = False) -> "SealedBlock":
        """A block for (`namespace`, `key`). `checksum` is `block_checksum(payload, namespace, key,
        expires_at)` (signed or unsigned 64-bit) when the caller already has it (the engine computes
        it on the GPU): it is trusted here and checked on every read. A mutable buffer is copied
        once so later writes cannot change it, unless `borrow`: the caller keeps it unchanged
        until the block is stored (a slab slot under a lease), and no copy is made."""
        data = payload if isinstance(payload, bytes) or borrow else bytes(payload)
        checksum = block_checksum(data, namespace, key, expires_at) if checksum is None else to_int64(checksum)
        return cls(data, checksum, len(data), expires_at)

    def intact(self, namespace: str, key: bytes) -> bool:
        """Whether this is the block that was put under (`namespace`, `key`): its length, a
        storable expiry, and the checksum over payload, namespace, key, length and expiry."""
        return (self.length == len(self.payload) and _valid_expiry(self.expires_at)
                and block_checksum(self.payload, namespace, key, self.expires_at) == self.checksum)

    def with_expiry(self, namespace: str, key: bytes, expires_at: float | None) -> "SealedBlock":
        """The same block bound to another expiry. Only the tag is swapped (the payload is not
        read), so a block whose checksum did not match still does not."""
        length = len(self.payload)
        checksum = (self.checksum ^ block_tag(namespace, key, length, self.expires_at)
                    ^ block_tag(namespace, key, length, expires_at))
        return SealedBlock(self.payload, checksum, self.length, expires_at)

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (time.time() if now is None else now)

    def header(self) -> bytes:
        return _HEADER.pack(MAGIC, VERSION, ALGORITHM_BLOCKSUM, 0, len(self.payload), self.checksum,
                            self.expires_at or 0.0)

    def frame(self) -> bytes:
        """`header || payload`, the value Redis and S3 store."""
        return self.header() + self.payload

    @classmethod
    def from_frame(cls, frame: bytes) -> "SealedBlock":
        """Decode a stored frame; never raises (an unreadable or older header gives a block that
        is not intact)."""
        if len(frame) < HEADER_BYTES:
            return cls(b"", 0, -1)
        magic, version, algorithm, _, length, checksum, expires_at = _HEADER.unpack_from(frame)
        if magic != MAGIC or version != VERSION or algorithm != ALGORITHM_BLOCKSUM:
            return cls(b"", 0, -1)
        return cls(frame[HEADER_BYTES:], checksum, length, expires_at or None)


# --- The block checksum: what the engine computes on the GPU and every tier can check ---------------
#
# A KV block is hashed where its bytes already are: on the GPU at save (over the pages it gathers)
# and over the destination pages after a load, so the check is end to end (DMA, slab, daemon, Redis,
# S3) and costs the host nothing. The function must be the same on the GPU (Triton), in torch on the
# CPU and here (numpy), and it must be cheap on all three: 64-bit integer sums are (12 GB/s per CPU
# core against 0.6 GB/s for 32-bit words widened to 64, and memory-bound on a GPU), and additions and
# multiplications modulo 2^64 give the same result in any reduction order, so every implementation
# agrees bit for bit.
#
#   words   = the payload as little-endian int64, zero-padded to whole chunks of CHUNK_BYTES
#   r[c]    = sum of chunk c's 128 words                    (mod 2^64)
#   data    = sum(r) XOR (sum((c + 1) * r[c]) * MIX)          (mod 2^64)
#   block   = data XOR tag(namespace, key, length, expires_at)
#
# The first sum catches any changed word (a flipped bit changes it by a power of two); the weighted
# one catches whole chunks (pages, layers) moved or swapped. The tag binds the value to where it
# belongs: a valid block copied under another key or namespace, truncated, or given another expiry,
# no longer checks.

CHUNK_BYTES = 1024
MIX = 0x9E3779B97F4A7C15   # 2^64 / golden ratio: an odd multiplier that spreads the weighted sum
_MASK64 = (1 << 64) - 1


def to_int64(value: int) -> int:
    """An unsigned 64-bit value as the signed int64 that tensors and protobuf int64 fields hold."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def combine_chunk_sums(s1: int, s2: int) -> int:
    """`data` from the plain and the position-weighted sums of the chunk sums (signed int64)."""
    return to_int64(s1 ^ (s2 * MIX))


def block_tag(namespace: str, key: bytes, length: int, expires_at: float | None) -> int:
    """What binds a block's checksum to its namespace, key, length and expiry (signed int64)."""
    digest = hashlib.blake2b(struct.pack("<Qd", length, expires_at or 0.0) + key + namespace.encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def data_checksum(payload: bytes | bytearray | memoryview) -> int:
    """The unbound part of the block checksum of `payload` (signed int64)."""
    data = np.frombuffer(payload, dtype=np.uint8)
    tail = len(data) % CHUNK_BYTES
    if tail:
        data = np.concatenate([data, np.zeros(CHUNK_BYTES - tail, dtype=np.uint8)])
    rows = data.view("<i8").reshape(-1, CHUNK_BYTES // 8).sum(axis=1, dtype=np.int64)
    weights = np.arange(1, len(rows) + 1, dtype=np.int64)
    with np.errstate(over="ignore"):
        return combine_chunk_sums(int(rows.sum(dtype=np.int64)), int((rows * weights).sum(dtype=np.int64)))


def block_checksum(payload: bytes | bytearray | memoryview, namespace: str, key: bytes,
                   expires_at: float | None = None) -> int:
    """The checksum a block of `payload` stored under (`namespace`, `key`) carries through every tier."""
    return data_checksum(payload) ^ block_tag(namespace, key, len(payload), expires_at)
