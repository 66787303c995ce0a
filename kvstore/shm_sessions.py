"""The daemon's side of the same-host fast path: shared-memory segments clients attached.

A client creates a segment under /dev/shm and announces it with AttachShm; the daemon opens the
file and keeps the descriptor for the session's life. Block bytes are copied with `os.pread` /
`os.pwrite` on that descriptor rather than through an mmap: a client that shrinks its file after
attaching then gets a short read (an INVALID_ARGUMENT for that call) instead of a SIGBUS that would
kill the daemon. On tmpfs a pread is one memcpy, the same cost as reading a mapping.

Every handle is checked against the size declared at attach time before any byte moves.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
NAME_PREFIX = "tierkv-"
NONCE_BYTES = 16
# The name is a file in one flat directory: no separators, no dot-dot, bounded length.
_NAME_RE = re.compile(r"^tierkv-[A-Za-z0-9_-]{1,64}$")


class ShmError(ValueError):
    """A shared-memory request the daemon refuses; `kind` picks the status code."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind   # "invalid" | "unavailable" | "exhausted"


def check_name(name: str) -> None:
    """Segment names are `tierkv-` + up to 64 of [A-Za-z0-9_-]: nothing else under /dev/shm is reachable."""
    if not _NAME_RE.match(name):
        raise ShmError("invalid", "name: expected 'tierkv-' followed by 1-64 letters, digits, '-' or '_'")


@dataclass
class ShmSession:
    """One attached segment: its descriptor, its declared size, and when the session ends."""

    session_id: str
    name: str
    size: int
    fd: int
    ended: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _users: int = 0
    _closed: bool = False

    @contextmanager
    def in_use(self) -> Iterator["ShmSession"]:
        """Hold the descriptor open for one call: a detach meanwhile closes it only afterwards,
        so the number is never reused for another file while a call still reads through it."""
        with self._lock:
            if self._closed:
                raise ShmError("unavailable", "session_id: the shm session ended (attach again)")
            self._users += 1
        try:
            yield self
        finally:
            with self._lock:
                self._users -= 1
                close = self._closed and self._users == 0
            if close:
                os.close(self.fd)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            close = self._users == 0
        self.ended.set()
        if close:
            os.close(self.fd)

    def read(self, offset: int, length: int, what: str) -> bytes:
        """The bytes of [offset, offset + length); bounds were checked by `check_span`."""
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise ShmError("invalid", f"{what}: the segment holds only {os.fstat(self.fd).st_size} bytes "
                                      f"(it was truncated after attaching)")
        return data

    def write(self, offset: int, data: bytes, what: str) -> None:
        written = os.pwrite(self.fd, data, offset)
        if written != len(data):
            raise ShmError("exhausted", f"{what}: wrote {written} of {len(data)} bytes into the segment")

    def check_span(self, offset: int, length: int, what: str) -> None:
        if offset > self.size or length > self.size - offset:
            raise ShmError("invalid", f"{what}: [{offset}, {offset + length}) lies outside the "
                                      f"{self.size}-byte segment")


class ShmSessions:
    """The segments attached to this daemon, by session id. Thread-safe."""

    def __init__(self, enabled: bool, max_sessions: int, shm_dir: Path = SHM_DIR):
        self.enabled = enabled
        self.max_sessions = max_sessions
        self._dir = shm_dir
        self._sessions: dict[str, ShmSession] = {}
        self._lock = threading.Lock()

    def attach(self, name: str, size: int) -> tuple[ShmSession, bytes]:
        """Open the client's segment; the session and the segment's first NONCE_BYTES."""
        if not self.enabled:
            raise ShmError("unavailable", "shared memory is off in this daemon (shm: false); use Put and Get")
        check_name(name)
        if size < NONCE_BYTES:
            raise ShmError("invalid", f"size: expected at least {NONCE_BYTES} bytes")
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise ShmError("exhausted", f"shm sessions: {self.max_sessions} already attached "
                                            f"(shm_max_sessions); use Put and Get")
        fd = self._open(name, size)
        try:
            nonce = os.pread(fd, NONCE_BYTES, 0)
        except OSError:
            os.close(fd)
            raise
        session = ShmSession(secrets.token_hex(16), name, size, fd)
        with self._lock:
            self._sessions[session.session_id] = session
        log.info("shm session %s attached segment %s (%d bytes)", session.session_id[:8], name, size)
        return session, nonce

    def _open(self, name: str, size: int) -> int:
        try:
            # O_NOFOLLOW: a symlink planted under the name cannot point the daemon elsewhere.
            fd = os.open(self._dir / name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as error:
            raise ShmError("unavailable", f"cannot open segment {name} under {self._dir} ({error.strerror}): "
                                          f"the daemon does not share /dev/shm with the client") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != size:
            os.close(fd)
            raise ShmError("invalid", f"size: the segment {name} is not a {size}-byte regular file")
        return fd

    def get(self, session_id: str) -> ShmSession:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise ShmError("unavailable", "session_id: unknown shm session (it ended; attach again)")
        return session

    def detach(self, session_id: str) -> None:
        """Close the session's descriptor (the client, as the segment's creator, unlinks it)."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            session.close()
            log.info("shm session %s detached", session_id[:8])

    def end_all(self) -> None:
        """End every session's AttachShm stream (daemon shutdown); each stream then detaches."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.ended.set()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._sessions)
