"""A same-host client's session on the daemon's slab: the slots mapped here, and the calls that lease them.

`SlabClient` attaches (AttachSlab: a stream that lasts as long as the session), maps the daemon's
segment read-write (kvstore/slab_segment.py), reads the nonce from its own mapping and sends it with
every call, which proves to the daemon that it mapped the right file on the right host. Block bytes
never cross gRPC: the caller writes slots it allocated and then commits them, or acquires the slots of
stored blocks and reads them before releasing them.

The client counts the leases it holds. When the session ends (the daemon stopped or restarted, the
connection broke), calls lease nothing (`allocate`, `acquire` return []) and commits store nothing
until a new session is attached; a background thread re-attaches, at most every `REATTACH_S`
seconds, once every lease of the old session was given back (committed or released): then no copy
into or out of the old mapping is in flight, and the new daemon's segment is mapped at the same
address, so the caller's views of `slots` stay valid. A daemon that comes back with another slab
geometry is not re-attached (the caller's views could not cover it).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from kvstore.auth import bearer_metadata
from kvstore.client import KVStoreError, Target, open_channel
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.slab import SlotBlock
from kvstore.slab_segment import MappedSegment, SegmentError

log = logging.getLogger(__name__)

REATTACH_S = 5.0


class SlabRefused(RuntimeError):
    """The slab cannot be used from here: the daemon refused, or its segment cannot be mapped."""


def is_local_host(address: str) -> bool:
    """Whether a `host:port` target names this machine by a loopback address (or `localhost`)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in (socket.gethostname(), socket.getfqdn())


@dataclass(frozen=True)
class _Session:
    handle: pb.SlabHandle
    call: object


class SlabClient:
    """A session on a same-host daemon's slab (sync, thread-safe).

    `mapped(slots)` is called with the slots' memory once it is mapped (and again after each
    re-attach), `unmapping(slots)` before it is replaced or unmapped: the engine registers it with
    CUDA as pinned memory there.
    """

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 30.0,
                 root_certificates: bytes | None = None, mapped: Callable[[memoryview], None] | None = None,
                 unmapping: Callable[[memoryview], None] | None = None) -> None:
        self.timeout_s = timeout_s
        self._metadata = bearer_metadata(token)
        self._channel = open_channel(Target.parse(url), root_certificates)
        self._stub = pb_grpc.KVStoreStub(self._channel)
        self._mapped = mapped
        self._unmapping = unmapping
        self._segment: MappedSegment | None = None
        self._session: _Session | None = None
        self._leases: Counter[int] = Counter()
        self._changed = threading.Condition()
        self._retry_at = 0.0
        self._closed = threading.Event()
        try:
            self._attach()
        except SlabRefused:
            self._channel.close()
            raise
        self._reattacher = threading.Thread(target=self._reattach_loop, name="kvstore-slab-reattach", daemon=True)
        self._reattacher.start()

    # --- the mapping ----------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return self._segment.num_slots

    @property
    def slot_bytes(self) -> int:
        return self._segment.slot_bytes

    @property
    def slots(self) -> memoryview:
        """The slots' memory, `num_slots * slot_bytes` bytes (the same address for the client's life)."""
        return self._segment.slots

    def view(self, slot: int) -> memoryview:
        start = slot * self.slot_bytes
        return self.slots[start:start + self.slot_bytes]

    @property
    def attached(self) -> bool:
        return self._session is not None

    # --- leases ---------------------------------------------------------------------------------
    def allocate(self, count: int, timeout: float | None = None) -> list[int]:
        """Lease up to `count` empty slots ([] while no session is attached)."""
        session = self._session
        if session is None or count < 1:
            return []
        request = pb.AllocateSlotsRequest(session=session.handle, count=count)
        response = self._call(session, "AllocateSlots", self._stub.AllocateSlots, request, timeout)
        slots = list(response.slots) if response is not None else []
        return slots if self._hold(session, slots) else []

    def acquire(self, namespace: str, keys: list[bytes]) -> list[SlotBlock]:
        """Lease the slots of the leading stored blocks ([] while no session is attached)."""
        session = self._session
        if session is None or not keys:
            return []
        request = pb.AcquireSlotsRequest(session=session.handle, namespace=namespace, keys=keys)
        response = self._call(session, "AcquireSlots", self._stub.AcquireSlots, request)
        blocks = [SlotBlock(b.slot, b.checksum, b.expires_at or None, b.length)
                  for b in (response.blocks if response is not None else [])]
        return blocks if self._hold(session, [b.slot for b in blocks]) else []

    def commit(self, namespace: str, keys: list[bytes], slots: list[int], checksums: list[int],
               expires_at: list[float | None], *, tiers: list[str] | None = None, ttl_s: float | None = None) -> int:
        """Store whole slots this client allocated and wrote (`checksums[i]`: the block checksum of
        slot i's bytes under `keys[i]`, bound to `expires_at[i]`); the number stored. The leases end
        whatever happens; 0 when the session ended meanwhile."""
        session, _ = self._forget(slots)
        if session is None:
            return 0
        header = pb.PutHeader(namespace=namespace, tiers=tiers or [])
        if ttl_s is not None:
            header.ttl_s = ttl_s
        blocks = [pb.CommittedSlot(key=k, slot=s, checksum=c, expires_at=e or 0.0)
                  for k, s, c, e in zip(keys, slots, checksums, expires_at, strict=True)]
        request = pb.CommitSlotsRequest(session=session.handle, header=header, blocks=blocks)
        response = self._call(session, "CommitSlots", self._stub.CommitSlots, request)
        return response.stored if response is not None else 0

    def release(self, slots: list[int]) -> None:
        """End leases; slots this client no longer holds (committed, or its session ended) are skipped."""
        session, held = self._forget(slots)
        if session is None or not held:
            return
        self._call(session, "ReleaseSlots", self._stub.ReleaseSlots,
                   pb.ReleaseSlotsRequest(session=session.handle, slots=held))

    def close(self) -> None:
        self._closed.set()
        with self._changed:
            session, self._session = self._session, None
            self._changed.notify_all()
        if session is not None:
            session.call.cancel()
        self._reattacher.join(timeout=5)
        if self._unmapping is not None:
            self._unmapping(self._segment.slots)
        self._segment.close()
        self._channel.close()

    def __enter__(self) -> "SlabClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ------------------------------------------------------------------------------
    def _hold(self, session: _Session, slots: list[int]) -> bool:
        """Count leases a call of `session` got; False when the session ended under the call (the
        daemon released them with it)."""
        with self._changed:
            if self._session is not session:
                return False
            self._leases.update(slots)
            return True

    def _forget(self, slots: list[int]) -> tuple[_Session | None, list[int]]:
        """Drop `slots` from the leases held: the session to tell (None when it ended), and which of
        them this client did hold."""
        with self._changed:
            held = []
            for slot in slots:
                if self._leases[slot] > 0:
                    held.append(slot)
                    self._leases[slot] -= 1
                    if not self._leases[slot]:
                        del self._leases[slot]
            self._changed.notify_all()
            return self._session, held

    def _call(self, session: _Session, method: str, rpc, request, timeout: float | None = None):
        """One slab call; None when the session turned out to be gone (it is dropped here)."""
        try:
            return rpc(request, timeout=timeout or self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                log.warning("kvstore %s: %s; the slab session is dropped", method, error.details())
                session.call.cancel()   # its done-callback detaches
                return None
            raise KVStoreError(method, error.code(), error.details() or "") from None

    def _attach(self) -> None:
        call = self._stub.AttachSlab(pb.AttachSlabRequest(), metadata=self._metadata)
        # The session stream has no deadline (it lives as long as the session); only its first
        # message must come within the timeout.
        timer = threading.Timer(self.timeout_s, call.cancel)
        timer.start()
        try:
            first = next(call)
        except grpc.RpcError as error:
            raise SlabRefused(f"AttachSlab: {error.code().name}: {error.details()}") from None
        except StopIteration:
            raise SlabRefused("AttachSlab: the daemon ended the session at once") from None
        finally:
            timer.cancel()
        try:
            self._map(first)
            handle = pb.SlabHandle(session_id=first.session_id,
                                   nonce=self._segment.nonce(first.nonce_offset, first.nonce_len))
            # An empty release proves the mapping: the daemon checks the nonce on every slab call.
            self._stub.ReleaseSlots(pb.ReleaseSlotsRequest(session=handle), timeout=self.timeout_s,
                                    metadata=self._metadata)
        except (SegmentError, grpc.RpcError) as error:
            call.cancel()
            reason = error.details() if isinstance(error, grpc.RpcError) else str(error)
            raise SlabRefused(f"the daemon's slab cannot be used from here: {reason}") from None
        session = _Session(handle, call)
        with self._changed:
            self._session = session
        call.add_done_callback(lambda _call: self._ended(session))
        log.info("kvstore: attached the daemon's slab (%d slots of %d bytes)", first.num_slots, first.slot_bytes)

    def _map(self, first: pb.SlabSession) -> None:
        if self._segment is None:
            self._segment = MappedSegment(first.segment_name, first.num_slots, first.slot_bytes, first.slots_offset)
        else:
            old = self._segment
            if (first.num_slots, first.slot_bytes, first.slots_offset) != (old.num_slots, old.slot_bytes,
                                                                           old.slots_offset):
                raise SegmentError(0, f"the daemon's slab changed shape ({first.num_slots} slots of "
                                      f"{first.slot_bytes} bytes, was {old.num_slots} of {old.slot_bytes})")
            if self._unmapping is not None:
                self._unmapping(old.slots)
            try:
                old.remap(first.segment_name)
            finally:
                if self._mapped is not None:
                    self._mapped(old.slots)
            return
        if self._mapped is not None:
            self._mapped(self._segment.slots)

    def _ended(self, session: _Session) -> None:
        with self._changed:
            if self._session is not session:
                return
            self._session = None
            self._retry_at = time.monotonic() + REATTACH_S
            self._changed.notify_all()
        if not self._closed.is_set():
            log.warning("kvstore: the slab session ended; slots are re-leased once it re-attaches")

    def _reattach_loop(self) -> None:
        while not self._closed.is_set():
            with self._changed:
                # Only with no lease of the old session left: no copy can still use the old mapping.
                self._changed.wait_for(lambda: self._closed.is_set() or (self._session is None and not self._leases))
            if self._closed.wait(max(0.0, self._retry_at - time.monotonic())):
                return
            try:
                self._attach()
            except SlabRefused as error:
                log.info("kvstore: re-attaching the slab failed (%s); next try in %.0f s", error, REATTACH_S)
                self._retry_at = time.monotonic() + REATTACH_S
