"""The daemon's side of the same-host slab: sessions, the leases each holds, and the slab calls.

An engine on the daemon's host attaches (AttachSlab, a stream that lasts as long as the session),
maps the slab segment (kvstore/tiers/slab.py) and then leases slots by number: empty ones to write
blocks into (allocate, then commit), filled ones to read blocks out of (acquire, then release). Every
call names its session and carries the segment's nonce, which only a client that mapped the segment
can read. Every slot number is checked before the slab sees it: in range, and leased by this very
session (commit: allocated to it); a session can neither commit into nor release a slot another
holds. When the session's stream ends — the client closed it, its process died, the daemon stops —
every lease it still holds is released, so a dead engine never pins slots.

An acquire that finds blocks only below the slab brings them up first: read from the lower tiers,
written into allocated slots and (with `promote_on_hit`) indexed there, leased to the caller like
any hit. A commit writes the lower tiers it names from the slot bytes. Blocks the slab evicts to
make room for these calls are written down to the next tier by a background thread, so no slab call
waits for Redis or S3 on account of another block.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import takewhile

from kvstore import tier_metrics
from kvstore.checksum import SealedBlock, block_tag
from kvstore.slab import SlotBlock
from kvstore.slab_segment import HEADER_BYTES, NONCE_BYTES, NONCE_OFFSET
from kvstore.store import TieredStore
from kvstore.tiers.slab import SlabTier

log = logging.getLogger(__name__)


class SlabError(ValueError):
    """A slab call the daemon refuses; `kind` picks the status code."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind   # "invalid" | "unavailable" | "exhausted"


@dataclass
class SlabSession:
    """One attached client and the leases it holds."""

    session_id: str
    ended: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    allocated: set[int] = field(default_factory=set)              # empty slots it is writing
    acquired: Counter[int] = field(default_factory=Counter)       # filled slots it is reading
    closed: bool = False


@dataclass(frozen=True)
class CommitEntry:
    key: bytes
    slot: int
    checksum: int
    expires_at: float | None


class SlabSessions:
    """The sessions attached to this daemon's slab, and the calls they make. Thread-safe."""

    def __init__(self, store: TieredStore, max_sessions: int) -> None:
        first = store.tier(store.tier_names[0])
        self.tier = first if isinstance(first, SlabTier) else None
        self.max_sessions = max_sessions
        self._store = store
        self._sessions: dict[str, SlabSession] = {}
        self._lock = threading.Lock()
        self._evictions = threading.Event()
        self._stopping = False
        self._writer = None
        if self.tier is not None:
            self._writer = threading.Thread(target=self._write_down_loop, name="kvstore-slab-write-down", daemon=True)
            self._writer.start()

    # --- sessions -------------------------------------------------------------------------------
    def attach(self) -> SlabSession:
        if self.tier is None:
            raise SlabError("unavailable", "this daemon has no slab (its first tier is not a memory tier with "
                                           "slot_bytes); use Put and Get")
        session = SlabSession(secrets.token_hex(16))
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise SlabError("exhausted", f"slab sessions: {self.max_sessions} already attached "
                                             f"(shm_max_sessions); use Put and Get")
            self._sessions[session.session_id] = session
        log.info("slab session %s attached", session.session_id[:8])
        return session

    def describe(self, session: SlabSession) -> dict:
        """What the client needs to map the slab (the fields of the first AttachSlab message)."""
        return {"session_id": session.session_id, "segment_name": self.tier.segment.name,
                "num_slots": self.tier.slab.num_slots, "slot_bytes": self.tier.slot_bytes,
                "slots_offset": HEADER_BYTES, "nonce_offset": NONCE_OFFSET, "nonce_len": NONCE_BYTES}

    def detach(self, session_id: str) -> None:
        """End a session: every lease it holds is released."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            return
        with session.lock:
            session.closed = True
            slots = list(session.allocated) + list(session.acquired.elements())
            session.allocated.clear()
            session.acquired.clear()
        session.ended.set()
        self.tier.slab.release(slots)
        log.info("slab session %s detached (%d lease(s) released)", session_id[:8], len(slots))

    def end_all(self) -> None:
        """End every session's AttachSlab stream (daemon shutdown); each stream then detaches."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.ended.set()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def close(self) -> None:
        """Stop the write-down thread once it has written what is queued."""
        self._stopping = True
        self._evictions.set()
        if self._writer is not None:
            self._writer.join(timeout=30)

    # --- slab calls -----------------------------------------------------------------------------
    def session(self, session_id: str, nonce: bytes) -> SlabSession:
        """The caller's session, once it proved it mapped this daemon's segment."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise SlabError("unavailable", "session_id: unknown slab session (it ended; attach again)")
        if not hmac.compare_digest(nonce, self.tier.segment.nonce):
            raise SlabError("unavailable", "session.nonce: not this daemon's slab segment (the client mapped "
                                           "another file: another host, or another /dev/shm)")
        return session

    def allocate(self, session: SlabSession, count: int) -> list[int]:
        slots = self.tier.slab.allocate(count)
        self._wake_writer()
        with session.lock:
            if not session.closed:
                session.allocated.update(slots)
                return slots
        self.tier.slab.release(slots)
        raise _ended()

    def acquire(self, session: SlabSession, namespace: str, keys: list[bytes]) -> list[SlotBlock]:
        """Leases of the leading blocks present in any tier (those found below brought into slots)."""
        blocks = self.tier.slab.acquire(namespace, keys)
        if len(blocks) < len(keys) and len(self._store.tier_names) > 1:
            blocks += self._bring_up(namespace, keys[len(blocks):])
        with session.lock:
            if not session.closed:
                session.acquired.update(block.slot for block in blocks)
                return blocks
        self.tier.slab.release([block.slot for block in blocks])
        raise _ended()

    def commit(self, session: SlabSession, namespace: str, entries: list[CommitEntry], tiers: list[str] | None,
               ttl_s: float | None) -> int:
        """Store blocks the session wrote into slots it allocated; the number stored. The leases end."""
        slots = [entry.slot for entry in entries]
        with session.lock:
            if session.closed:
                raise _ended()
            seen: set[int] = set()
            for i, slot in enumerate(slots):
                self._check_range(slot, f"blocks[{i}].slot")
                if slot not in session.allocated or slot in seen:
                    raise SlabError("invalid", f"blocks[{i}].slot: slot {slot} is not allocated to this session")
                seen.add(slot)
            session.allocated.difference_update(slots)   # this call owns the leases now
        try:
            return self._store_slots(namespace, entries, tiers, ttl_s)
        finally:
            self.tier.slab.release(slots)

    def release(self, session: SlabSession, slots: list[int]) -> None:
        with session.lock:
            if session.closed:
                raise _ended()
            wanted = Counter()
            for i, slot in enumerate(slots):
                self._check_range(slot, f"slots[{i}]")
                wanted[slot] += 1
                if wanted[slot] > session.acquired[slot] + (slot in session.allocated):
                    raise SlabError("invalid", f"slots[{i}]: slot {slot} is not leased by this session")
            for slot in slots:
                if session.acquired[slot]:
                    session.acquired[slot] -= 1
                    if not session.acquired[slot]:
                        del session.acquired[slot]
                else:
                    session.allocated.discard(slot)
        self.tier.slab.release(slots)

    # --- internals ------------------------------------------------------------------------------
    def _check_range(self, slot: int, what: str) -> None:
        if not 0 <= slot < self.tier.slab.num_slots:
            raise SlabError("invalid", f"{what}: {slot} is not a slot of this slab (it has {self.tier.slab.num_slots})")

    def _bring_up(self, namespace: str, keys: list[bytes]) -> list[SlotBlock]:
        """Blocks found only below the slab, written into leased slots (and indexed: promoted)."""
        slab = self.tier.slab
        below = self._store.get_sealed_below(namespace, keys, self.tier.name)
        found = list(takewhile(lambda b: b is not None and len(b.payload) <= slab.slot_bytes, below))
        slots = slab.allocate(len(found))
        self._wake_writer()
        blocks = []
        for block, slot in zip(found, slots):
            slab.view(slot)[:len(block.payload)] = block.payload
            blocks.append(SlotBlock(slot, block.checksum, block.expires_at, len(block.payload)))
        if blocks and self._store.promote_on_hit:
            slab.commit(namespace, keys[:len(blocks)], slots, [b.checksum for b in blocks],
                        [b.expires_at for b in blocks], lengths=[b.length for b in blocks], keep_lease=True)
            tier_metrics.PROMOTIONS.labels(self.tier.name).inc(len(blocks))
        return blocks

    def _store_slots(self, namespace: str, entries: list[CommitEntry], tiers: list[str] | None,
                     ttl_s: float | None) -> int:
        slab = self.tier.slab
        size = slab.slot_bytes
        checksums = [entry.checksum for entry in entries]
        expiries = [entry.expires_at for entry in entries]
        if ttl_s is not None:
            # Rebind each checksum to the new expiry: only the tag changes, the bytes are not read.
            expires_at = time.time() + ttl_s
            checksums = [c ^ block_tag(namespace, e.key, size, e.expires_at)
                         ^ block_tag(namespace, e.key, size, expires_at) for c, e in zip(checksums, entries)]
            expiries = [expires_at] * len(entries)
        targets = tiers or self._store.tier_names[:1]
        keys = [entry.key for entry in entries]
        stored = 0
        if self.tier.name in targets:
            slab.commit(namespace, keys, [entry.slot for entry in entries], checksums, expiries, keep_lease=True)
            tier_metrics.BYTES_IN.labels(self.tier.name).inc(size * len(entries))
            stored = len(entries)
        lower = [name for name in targets if name != self.tier.name]
        if lower:
            blocks = [(key, SealedBlock(bytes(slab.view(entry.slot)), checksum, size, expires))
                      for key, entry, checksum, expires in zip(keys, entries, checksums, expiries)]
            stored = max(stored, self._store.put_sealed(namespace, blocks, tiers=lower))
        return stored

    def _wake_writer(self) -> None:
        if self.tier.has_evicted:
            self._evictions.set()

    def _write_down_loop(self) -> None:
        while True:
            self._evictions.wait()
            self._evictions.clear()
            try:
                self._store.write_down(self.tier.name, self.tier.take_evicted())
            except Exception:  # noqa: BLE001 - a failed write-down loses blocks, never the thread
                log.exception("writing evicted slab blocks down failed")
            if self._stopping:
                return


def _ended() -> SlabError:
    return SlabError("unavailable", "session_id: the slab session ended (attach again)")
