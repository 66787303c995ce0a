"""The client's same-host fast path: block bytes through a shared-memory segment, handles over gRPC.

`ShmTransport` belongs to one `KVStoreClient`. It creates a segment (kvstore/shm_segment.py),
attaches it with AttachShm (a stream that lives as long as the session: when it ends, for any
reason, the daemon has closed its side), and then moves blocks with PutShm / GetShm naming slots.
Put: the client writes each block into a slot and sends (key, offset, length, checksum, expiry);
the daemon copies it out, verifies it and stores it with that checksum. Get: the client names slots;
the daemon writes each hit and returns its length, stored checksum and expiry; the client verifies it
against the namespace and key it asked for (a mismatch is a miss, never bad bytes), or, with
`get_slot_hits`, leaves that to a caller that checks the bytes where it moves them (the engine's GPU).

When the session ends (daemon restarted, connection lost), calls raise `ShmUnavailable` and the
client uses the payload path; a new segment is attached on a later call, at most every
`REATTACH_S` seconds.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from kvstore.checksum import SealedBlock, block_checksum
from kvstore.proto import kvstore_pb2 as pb
from kvstore.shm_segment import ShmSegment, SlotLease

log = logging.getLogger(__name__)

REATTACH_S = 5.0


class ShmUnavailable(RuntimeError):
    """The shared-memory path cannot serve this call; use the payload path."""


@dataclass(frozen=True, slots=True)
class SlotHit:
    """A block the daemon wrote into a slot, as the daemon declared it: `length` bytes, the stored
    checksum and the expiry that checksum is bound to. `too_large`: it did not fit (nothing written)."""

    length: int
    checksum: int
    expires_at: float | None
    too_large: bool = False

    def intact(self, data: bytes | memoryview, namespace: str, key: bytes) -> bool:
        """Whether `data` (the slot's first `length` bytes) is this block, stored under (namespace, key)."""
        return SealedBlock(data, self.checksum, self.length, self.expires_at).intact(namespace, key)


def is_local_host(address: str) -> bool:
    """Whether a `host:port` target names this machine by a loopback address (or `localhost`)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in (socket.gethostname(), socket.getfqdn())


class ShmTransport:
    """A shared-memory segment attached to the daemon, and put/get by handle through it."""

    def __init__(self, stub, metadata: tuple, attach_timeout_s: float, slot_bytes: int, num_slots: int,
                 on_segment: Callable[[ShmSegment], None] | None = None):
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self._stub = stub
        self._metadata = metadata
        self._attach_timeout_s = attach_timeout_s
        self._on_segment = on_segment
        self._lock = threading.Lock()
        self._segment: ShmSegment | None = None
        self._session_id = ""
        self._call = None
        self._retry_at = 0.0
        self.last_error = ""

    # --- session --------------------------------------------------------------------------------
    def attach(self) -> bool:
        """Create and attach a segment; False (reason in `last_error`) when the daemon refuses."""
        with self._lock:
            if self._segment is not None:
                return True
            try:
                self._attach()
                return True
            except ShmUnavailable as error:
                self.last_error = str(error)
                self._retry_at = time.monotonic() + REATTACH_S
                return False

    def _attach(self) -> None:
        try:
            segment = ShmSegment(self.slot_bytes, self.num_slots)
        except OSError as error:
            raise ShmUnavailable(f"cannot create a shared-memory segment: {error.strerror or error}") from None
        call = self._stub.AttachShm(pb.AttachShmRequest(name=segment.name, size=segment.size), metadata=self._metadata)
        # The session stream has no deadline (it lives as long as the session); only its first
        # message must come within the attach timeout.
        timer = threading.Timer(self._attach_timeout_s, call.cancel)
        timer.start()
        try:
            first = next(call)
        except grpc.RpcError as error:
            segment.close()
            raise ShmUnavailable(f"AttachShm: {error.code().name}: {error.details()}") from None
        except StopIteration:
            segment.close()
            raise ShmUnavailable("AttachShm: the daemon ended the session at once") from None
        finally:
            timer.cancel()
            segment.unlink()  # both sides hold it open now; nothing is left in /dev/shm whoever dies
        if first.nonce != segment.nonce:
            call.cancel()
            segment.close()
            raise ShmUnavailable("AttachShm: the daemon sees other bytes under the segment's name (not the same host)")
        if self._on_segment is not None:
            self._on_segment(segment)
        self._segment, self._session_id, self._call = segment, first.session_id, call
        call.add_done_callback(lambda _call: self._ended(segment))
        log.info("kvstore: shared-memory path on (%d slots of %d bytes)", self.num_slots, self.slot_bytes)

    def _ended(self, segment: ShmSegment) -> None:
        with self._lock:
            if self._segment is segment:
                self._segment, self._call = None, None
                self._retry_at = time.monotonic() + REATTACH_S
                log.warning("kvstore: shared-memory session ended; using the payload path until it re-attaches")

    @property
    def active(self) -> bool:
        return self._segment is not None

    @property
    def current_segment(self) -> ShmSegment | None:
        """The attached segment, without trying to attach one (never blocks)."""
        return self._segment

    def segment(self) -> ShmSegment:
        """The attached segment, attaching a new one if the last ended (and the backoff allows)."""
        segment = self._segment
        if segment is None and time.monotonic() >= self._retry_at:
            self.attach()
            segment = self._segment
        if segment is None:
            raise ShmUnavailable(self.last_error or "no shared-memory session")
        return segment

    def close(self) -> None:
        with self._lock:
            segment, call, self._segment, self._call = self._segment, self._call, None, None
        if call is not None:
            call.cancel()
        if segment is not None:
            segment.close()

    # --- by handle ------------------------------------------------------------------------------
    def put_slots(self, namespace: str, lease: SlotLease, blocks: list[tuple[bytes, int]], tiers: list[str] | None,
                  ttl_s: float | None, timeout: float, checksums: list[int] | None = None) -> int:
        """Store blocks already written in the lease's slots: `blocks[j] = (key, length)` is in slot j.
        `checksums[j]` is `block_checksum(slot j's bytes, namespace, key)` (no expiry) when the caller
        has it; without, it is computed here from the slots."""
        if checksums is None:
            checksums = [block_checksum(lease.view(j, length), namespace, key) for j, (key, length) in enumerate(blocks)]
        entries = [(key, lease.offset(j), length, checksum, None)
                   for j, ((key, length), checksum) in enumerate(zip(blocks, checksums, strict=True))]
        return self._put_handles(namespace, entries, tiers, ttl_s, timeout)

    def get_slot_hits(self, namespace: str, lease: SlotLease, keys: list[bytes], timeout: float) -> list[SlotHit | None]:
        """Fetch `keys[j]` into the lease's slot j, unverified: per key a `SlotHit` (check its checksum
        over the slot's first `length` bytes), or None for a miss."""
        slots = [pb.ShmSlot(key=key, offset=lease.offset(j), capacity=self.slot_bytes) for j, key in enumerate(keys)]
        request = pb.GetShmRequest(session_id=self._session_id, namespace=namespace, slots=slots)
        response = self._rpc(lambda: self._stub.GetShm(request, timeout=timeout, metadata=self._metadata))
        if len(response.results) != len(keys):
            raise ValueError(f"GetShm answered {len(response.results)} of {len(keys)} slots")
        return [SlotHit(hit.length, hit.checksum, hit.expires_at or None, hit.too_large)
                if hit.hit or hit.too_large else None for hit in response.results]

    def get_slots(self, namespace: str, lease: SlotLease, keys: list[bytes], timeout: float) -> list[int | None]:
        """Fetch `keys[j]` into the lease's slot j; per key its verified length, None for a miss
        (absent, failed checksum), or -1 when the block is larger than a slot (nothing written)."""
        lengths: list[int | None] = []
        for j, (key, hit) in enumerate(zip(keys, self.get_slot_hits(namespace, lease, keys, timeout))):
            if hit is None:
                lengths.append(None)
            elif hit.too_large:
                lengths.append(-1)
            elif hit.intact(lease.view(j, min(hit.length, self.slot_bytes)), namespace, key):
                lengths.append(hit.length)
            else:
                log.warning("kvstore GetShm: block #%d failed its checksum in the segment; treated as a miss", j)
                lengths.append(None)
        return lengths

    def _put_handles(self, namespace: str, entries: list[tuple[bytes, int, int, int, float | None]],
                     tiers: list[str] | None, ttl_s: float | None, timeout: float) -> int:
        """PutShm of `(key, offset, length, checksum, expires_at)` entries."""
        header = pb.PutHeader(namespace=namespace, tiers=tiers or [])
        if ttl_s is not None:
            header.ttl_s = ttl_s
        blocks = [pb.ShmBlock(key=key, offset=offset, length=length, checksum=checksum, expires_at=expires_at or 0.0)
                  for key, offset, length, checksum, expires_at in entries]
        request = pb.PutShmRequest(session_id=self._session_id, header=header, blocks=blocks)
        return self._rpc(lambda: self._stub.PutShm(request, timeout=timeout, metadata=self._metadata)).stored

    def _rpc(self, call: Callable[[], object]):
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                self._drop_session()
                raise ShmUnavailable(f"{error.code().name}: {error.details()}") from None
            raise

    def _drop_session(self) -> None:
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()  # its done-callback forgets the segment

    # --- by value (blocks copied into and out of slots) ------------------------------------------
    def put(self, namespace: str, blocks: list[tuple[bytes, SealedBlock]], tiers: list[str] | None,
            ttl_s: float | None, timeout: float) -> int:
        """Store sealed blocks of at most `slot_bytes` each, through the segment in windows of its
        slots; their checksums go as they are (the daemon verifies them against the slots)."""
        segment = self.segment()
        stored = 0
        for first in range(0, len(blocks), self._window(segment)):
            window = blocks[first : first + self._window(segment)]
            with self._lease(segment, len(window), timeout) as lease:
                for j, (_, block) in enumerate(window):
                    lease.view(j, len(block.payload))[:] = block.payload
                entries = [(key, lease.offset(j), len(block.payload), block.checksum, block.expires_at)
                           for j, (key, block) in enumerate(window)]
                stored += self._put_handles(namespace, entries, tiers, ttl_s, timeout)
        return stored

    def get(self, namespace: str, keys: list[bytes], timeout: float) -> list[SealedBlock | None | int]:
        """Verified blocks in key order; None for a miss, -1 for a block larger than a slot."""
        segment = self.segment()
        results: list[SealedBlock | None | int] = []
        for first in range(0, len(keys), self._window(segment)):
            window = keys[first : first + self._window(segment)]
            with self._lease(segment, len(window), timeout) as lease:
                for j, (key, hit) in enumerate(zip(window, self.get_slot_hits(namespace, lease, window, timeout))):
                    if hit is None:
                        results.append(None)
                    elif hit.too_large:
                        results.append(-1)
                    else:
                        # Copied out first, then checked: the copy is what the caller gets.
                        block = SealedBlock(bytes(lease.view(j, min(hit.length, self.slot_bytes))), hit.checksum,
                                            hit.length, hit.expires_at)
                        if block.intact(namespace, key):
                            results.append(block)
                        else:
                            log.warning("kvstore GetShm: block #%d failed its checksum in the segment; "
                                        "treated as a miss", first + j)
                            results.append(None)
        return results

    @staticmethod
    def _window(segment: ShmSegment) -> int:
        # Half the slots at most, so a copying call never waits for every lease others hold.
        return max(1, segment.num_slots // 2)

    @staticmethod
    def _lease(segment: ShmSegment, count: int, timeout: float) -> SlotLease:
        lease = segment.acquire(count, timeout)
        if lease is None:
            raise ShmUnavailable(f"no {count} free shared-memory slots within {timeout} s")
        return lease
