"""Self-verifying block values: a payload, its checksum, and the frame that carries both.

Every tier stores a block so that a read can prove the bytes are the ones that were put. The
memory tier keeps a `SealedBlock` object (the payload bytes are stored once and handed back as
is); Redis and S3 store the frame `header || payload`:

    magic "TKVB" | version u8 | algorithm u8 | reserved u16 | length u64 | checksum u64 | expires_at f64

CRC-32 (zlib) is the checksum: it measured 3.0 GB/s on one core here against 1.4 GB/s for
SHA-256 and 0.6 GB/s for BLAKE2b, it releases the GIL on large buffers, and it is meant to catch
corruption and truncation, not forgery (keys are already namespaced hashes). `expires_at` is wall
clock seconds (0 = no expiry), so a TTL survives a block moving between tiers and processes.
"""

from __future__ import annotations

import hashlib
import struct
import time
import zlib
from dataclasses import dataclass

import numpy as np

MAGIC = b"TKVB"
VERSION = 1
ALGORITHM_CRC32 = 1
_HEADER = struct.Struct("<4sBBHQQd")
HEADER_BYTES = _HEADER.size


def checksum(payload: bytes | memoryview) -> int:
    """The checksum every tier and the wire use for a block payload."""
    return zlib.crc32(payload)


@dataclass(frozen=True, slots=True)
class SealedBlock:
    """A payload with the checksum computed when it was put and its absolute expiry.

    `length` is what the header claimed: a frame whose header cannot be read decodes to a block
    with `length == -1`, so the caller treats it exactly like any other failed check.
    """

    payload: bytes
    checksum: int
    length: int
    expires_at: float | None = None

    @classmethod
    def seal(cls, payload: bytes | bytearray | memoryview, expires_at: float | None = None) -> "SealedBlock":
        """Checksum a payload; a mutable buffer is copied once so later writes can't change it."""
        data = payload if isinstance(payload, bytes) else bytes(payload)
        return cls(data, checksum(data), len(data), expires_at)

    def intact(self) -> bool:
        """Whether the payload still matches its length and checksum."""
        return self.length == len(self.payload) and checksum(self.payload) == self.checksum

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (time.time() if now is None else now)

    def header(self) -> bytes:
        return _HEADER.pack(MAGIC, VERSION, ALGORITHM_CRC32, 0, len(self.payload), self.checksum, self.expires_at or 0.0)

    def frame(self) -> bytes:
        """`header || payload`, the value Redis and S3 store."""
        return self.header() + self.payload

    @classmethod
    def from_frame(cls, frame: bytes) -> "SealedBlock":
        """Decode a stored frame; never raises (an unreadable header gives a block that is not intact)."""
        if len(frame) < HEADER_BYTES:
            return cls(b"", 0, -1)
        magic, version, algorithm, _, length, crc, expires_at = _HEADER.unpack_from(frame)
        if magic != MAGIC or version != VERSION or algorithm != ALGORITHM_CRC32:
            return cls(b"", 0, -1)
        return cls(frame[HEADER_BYTES:], crc, length, expires_at or None)


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
