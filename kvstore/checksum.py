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

import struct
import time
import zlib
from dataclasses import dataclass

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
