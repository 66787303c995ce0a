"""The client's shared-memory segment: a /dev/shm file it created and maps, cut into equal slots.

The client creates the file, reserves its pages (`posix_fallocate`: a full /dev/shm fails here,
with a message, instead of as a SIGBUS on a later write), writes a random nonce at offset 0 and
announces it to the daemon (AttachShm). Once the daemon has opened it, the client unlinks the name:
both sides keep their mapping or descriptor, and a process killed at any later moment leaves
nothing behind in /dev/shm (the memory is freed when the last side closes).

Calls lease contiguous runs of slots (`acquire`), so a run of blocks is one span of memory: one
D2H copy fills it, one H2D copy drains it. A slot is read or written by one side at a time; the
RPC's completion hands it back.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import secrets
import threading
from pathlib import Path

from kvstore.shm_sessions import NAME_PREFIX, NONCE_BYTES, SHM_DIR

log = logging.getLogger(__name__)


class SlotLease:
    """`count` consecutive slots starting at `first`; give them back with `release()` (or `with`)."""

    def __init__(self, segment: "ShmSegment", first: int, count: int):
        self.segment = segment
        self.first = first
        self.count = count
        self._released = False

    def offset(self, j: int) -> int:
        """Byte offset in the segment of the lease's j-th slot."""
        return (self.first + j) * self.segment.slot_bytes

    def view(self, j: int, length: int | None = None) -> memoryview:
        start = self.offset(j)
        return self.segment.buffer_view[start : start + (self.segment.slot_bytes if length is None else length)]

    def part(self, start: int, count: int) -> "SlotLease":
        """Slots [start, start + count) of this lease as a lease of their own that releases nothing."""
        part = SlotLease(self.segment, self.first + start, count)
        part._released = True
        return part

    @property
    def span(self) -> tuple[int, int]:
        """(offset, bytes) of the whole run."""
        return self.offset(0), self.count * self.segment.slot_bytes

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.segment.release(self)

    def __enter__(self) -> "SlotLease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ShmSegment:
    """`num_slots` slots of `slot_bytes` in a file under /dev/shm created by this process."""

    def __init__(self, slot_bytes: int, num_slots: int, shm_dir: Path = SHM_DIR):
        if slot_bytes < 1 or num_slots < 1:
            raise ValueError(f"shm segment: slot_bytes and num_slots must be positive, got {slot_bytes}, {num_slots}")
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self.size = max(slot_bytes * num_slots, NONCE_BYTES)
        self.name = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        self.path = Path(shm_dir) / self.name
        self.buffer = self._create()
        self.buffer_view = memoryview(self.buffer)
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        self.buffer[:NONCE_BYTES] = self.nonce
        self._free = [True] * num_slots
        self._changed = threading.Condition()

    def _create(self) -> mmap.mmap:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.size)
            return mmap.mmap(fd, self.size)
        except OSError as error:
            self.unlink()
            if error.errno == errno.ENOSPC:
                raise OSError(error.errno, f"/dev/shm has no room for a {self.size}-byte segment "
                                           f"(containers: raise --shm-size)") from None
            raise
        finally:
            os.close(fd)

    def acquire(self, count: int, timeout: float | None = None) -> SlotLease | None:
        """Lease `count` consecutive free slots, waiting up to `timeout` s (0 = don't wait); None if none."""
        if not 1 <= count <= self.num_slots:
            raise ValueError(f"shm segment: cannot lease {count} of {self.num_slots} slots")
        with self._changed:
            first = self._find_run(count)
            if first is None and timeout != 0:
                self._changed.wait_for(lambda: self._find_run(count) is not None, timeout)
                first = self._find_run(count)
            if first is None:
                return None
            self._free[first : first + count] = [False] * count
        return SlotLease(self, first, count)

    def _find_run(self, count: int) -> int | None:
        run = 0
        for i, free in enumerate(self._free):
            run = run + 1 if free else 0
            if run == count:
                return i - count + 1
        return None

    def release(self, lease: SlotLease) -> None:
        with self._changed:
            self._free[lease.first : lease.first + lease.count] = [True] * lease.count
            self._changed.notify_all()

    def unlink(self) -> None:
        """Remove the name from /dev/shm (mappings stay valid); safe to call more than once."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Unlink and unmap; a mapping still exported (a tensor view) is freed with its last view."""
        self.unlink()
        try:
            self.buffer_view.release()
            self.buffer.close()
        except BufferError:
            log.debug("shm segment %s still has views; it is unmapped when they go", self.name)
