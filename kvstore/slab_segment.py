"""The daemon's slab as a file under /dev/shm: created by the daemon, mapped by engines on its host.

Layout: a header page, then `num_slots` slots of `slot_bytes` (slot 0 starts on a page boundary, as
DMA and `cudaHostRegister` want). The header holds a magic and a random nonce; a client reads the
nonce from its own mapping and sends it with every slab call, which proves it mapped this daemon's
file (a client on another host, or in a container with another /dev/shm, cannot).

The daemon creates the file with mode 0600 (only its user, and root, can map it: they could ptrace
the daemon anyway), reserves its pages with `posix_fallocate` (a full /dev/shm fails at start, with a
message, instead of as a SIGBUS on a later write), and unlinks it on close. It holds an exclusive
`flock` on the file for its life: a daemon killed with SIGKILL cannot unlink, so every daemon first
removes segments whose lock nobody holds (their daemon is gone; engines keep their mappings).

The client maps the file read-write by name (`MappedSegment`). After a daemon restart it maps the
new daemon's file over the old mapping, at the same address (`remap`), so every view of the slots
(the engine's tensor, its pinned registration once renewed) stays valid.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import re
import secrets
import stat
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
NAME_PREFIX = "tierkv-"
MAGIC = b"TKVSLAB1"
NONCE_OFFSET = len(MAGIC)
NONCE_BYTES = 16
HEADER_BYTES = 4096
# Names the daemon gives its segments: nothing else under /dev/shm is ever mapped or removed.
_NAME_RE = re.compile(r"tierkv-[0-9]{1,10}-[0-9a-f]{16}")
# mmap(2)'s MAP_FIXED on Linux (Python's mmap module does not export it).
_MAP_FIXED = 0x10


class SegmentError(OSError):
    """A segment that cannot be created or mapped; the message says why."""


class SlabSegment:
    """The daemon's segment: created, locked and reserved at start, unlinked at `close`."""

    def __init__(self, num_slots: int, slot_bytes: int, shm_dir: Path = SHM_DIR) -> None:
        remove_stale_segments(shm_dir)
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.size = HEADER_BYTES + num_slots * slot_bytes
        self.name = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        self.path = Path(shm_dir) / self.name
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.posix_fallocate(self._fd, 0, self.size)
            self.buffer = mmap.mmap(self._fd, self.size)
        except OSError as error:
            self.close()
            if error.errno in (errno.ENOSPC, errno.EFBIG):
                raise SegmentError(error.errno, f"{shm_dir} has no room for a {self.size}-byte slab "
                                                f"({num_slots} slots of {slot_bytes} bytes)") from None
            raise
        self.buffer[:NONCE_OFFSET + NONCE_BYTES] = MAGIC + self.nonce
        self.slots = memoryview(self.buffer)[HEADER_BYTES:]

    def close(self) -> None:
        """Unlink the file and drop the lock; the mapping goes with its last view (engines keep theirs)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        slots = getattr(self, "slots", None)
        if slots is not None:
            try:
                slots.release()
                self.buffer.close()
            except BufferError:
                log.debug("slab segment %s still has views; it is unmapped when they go", self.name)


def remove_stale_segments(shm_dir: Path = SHM_DIR) -> None:
    """Unlink slab segments no live daemon holds (their daemon was killed before it could)."""
    for path in Path(shm_dir).glob(f"{NAME_PREFIX}*"):
        if not _NAME_RE.fullmatch(path.name):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.pread(fd, len(MAGIC), 0) == MAGIC:
                os.unlink(path)
                log.info("removed stale slab segment %s (its daemon is gone)", path.name)
        except OSError:
            pass   # held by a live daemon, or already gone
        finally:
            os.close(fd)


class MappedSegment:
    """A client's read-write mapping of the daemon's segment, checked against what the daemon declared."""

    def __init__(self, name: str, num_slots: int, slot_bytes: int, slots_offset: int, shm_dir: Path = SHM_DIR):
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.slots_offset = slots_offset
        self.size = slots_offset + num_slots * slot_bytes
        fd = _open(name, self.size, shm_dir)
        try:
            self.buffer = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        self.slots = memoryview(self.buffer)[slots_offset:]

    def nonce(self, offset: int, length: int) -> bytes:
        """The header's nonce as this mapping sees it."""
        return bytes(self.buffer[offset:offset + length])

    def remap(self, name: str, shm_dir: Path = SHM_DIR) -> None:
        """Map another daemon's segment of the same size over this mapping, at the same address.
        The caller makes sure no copy into or out of the old one is in flight."""
        fd = _open(name, self.size, shm_dir)
        try:
            address = ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_long]
            got = libc.mmap(address, self.size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED,
                            fd, 0)
            if got != address:
                raise SegmentError(ctypes.get_errno(), f"cannot map {name} over the old segment")
        finally:
            os.close(fd)

    def close(self) -> None:
        try:
            self.slots.release()
            self.buffer.close()
        except BufferError:
            log.debug("mapped slab segment still has views; it is unmapped when they go")


def _open(name: str, size: int, shm_dir: Path) -> int:
    if not _NAME_RE.fullmatch(name):
        raise SegmentError(errno.EINVAL, "segment_name: not a name a kvstore daemon gives its slab")
    try:
        # O_NOFOLLOW: a symlink planted under the name cannot point the mapping elsewhere.
        fd = os.open(Path(shm_dir) / name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise SegmentError(error.errno, f"cannot open {name} under {shm_dir} ({error.strerror}): the daemon "
                                        f"is not on this host, or does not share its /dev/shm") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size != size:
        os.close(fd)
        raise SegmentError(errno.EINVAL, f"{name} is not the {size}-byte slab the daemon declared")
    return fd
