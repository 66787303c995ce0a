"""The worker side of offloading into a slab: blocks saved and loaded without stalling other requests.

Save (engine thread, right after a step's forward is enqueued): the blocks that became full get slab
slots and their bytes are enqueued to move there (engine/connector/slab_copies.py: checksums over the
pages, a gather on the compute stream, the PCIe copies on a side stream). A background thread waits
for the copies, binds each checksum to its key and commits the blocks to the tiers the policy named.

Load: a background thread leases the slots of the blocks (the store first brings blocks found only in
a lower tier into slots), then enqueues their copies into the request's pages on a stream of the
load's own and the checksums over the destination pages. The copies wait for the compute work
enqueued before the load started: the pages were free, and a forward still in flight may have been
their last user. The engine thread polls the load's event; the request joins the running ones only
once its blocks are verified, so no forward reads a page before its bytes are checked. A mismatch
ends the load at that block: the request recomputes the rest and the bad copy is deleted.
"""

from __future__ import annotations

import logging
import queue
from collections import deque
import threading
import time
from dataclasses import dataclass, field

import torch

from engine.connector.cost_model import CostModel
from engine.connector.embedded_store import EmbeddedStore
from engine.connector.jobs import LoadJob, LoadResult, SaveJob, wait_drained
from engine.connector.metrics import ConnectorMetrics
from engine.connector.slab_copies import GatheredSave, SlabCopies
from kvstore.checksum import block_tag
from kvstore.slab import SlotBlock

logger = logging.getLogger(__name__)

_DONE = object()
# Blocks of one load queued on the copy engine at a time: two keep the link busy while the host
# issues the next (one alone left gaps: 74-83% of a pinned copy against 85-92% for all at once),
# and bound how long a decode step's own small copies can wait behind them (~1.2 ms).
_LOAD_BLOCKS_IN_FLIGHT = 2


@dataclass
class _Save:
    jobs: list[SaveJob]
    gathered: GatheredSave
    started: float                    # when the engine thread began taking the blocks off the pages


@dataclass
class _Load:
    job: LoadJob
    ready_after: torch.cuda.Event | None      # compute work the copies must follow
    blocks: list[SlotBlock] = field(default_factory=list)
    ok: torch.Tensor | None = None            # per block: checksum matched (host, once `event` is done)
    event: torch.cuda.Event | None = None
    head_ok: bool | None = None               # the first block, checked on the host (partly cached on the GPU)
    cancelled: bool = False
    fetched_s: float = 0.0                    # phases, for the per-load log line and metrics
    issued_s: float = 0.0


@dataclass
class _Release:
    """Slots a finished load leased, given back by the load thread: to a daemon that is an RPC,
    which must not hold up the engine thread."""

    slots: list[int]


def _truncate(jobs: list[SaveJob], blocks: int, pages_per_block: int) -> list[SaveJob]:
    """The first `blocks` blocks of `jobs`, in order."""
    kept = []
    for job in jobs:
        n = min(len(job.keys), blocks)
        if n:
            kept.append(SaveJob(job.keys[:n], job.page_ids[:n * pages_per_block], job.tiers, job.ttl_s))
            blocks -= n
    return kept


class SlabTransfer:
    """Saves and loads whole blocks (`pages_per_block` pages each) between the KV cache and a slab."""

    def __init__(self, kv_cache: torch.Tensor, store: EmbeddedStore, namespace: str, pages_per_block: int,
                 metrics: ConnectorMetrics, cost: CostModel) -> None:
        self.store = store
        self.cost = cost
        self.namespace = namespace
        self.ppb = pages_per_block
        self.metrics = metrics
        self.cuda = kv_cache.is_cuda
        self.device = kv_cache.device
        self.copies = SlabCopies(kv_cache, store.slab_rows, pages_per_block)
        self.block_bytes = self.copies.page_bytes * pages_per_block
        self._load_stream = torch.cuda.Stream(kv_cache.device) if self.cuda else None
        self._lock = threading.Lock()   # a load's pages are written only while it is not cancelled
        self._pending: dict[str, _Load] = {}
        self._issued: list[_Load] = []
        self._issued_changed = threading.Condition(self._lock)
        self._saves: queue.Queue = queue.Queue()
        self._loads: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._save_loop, name="kv-save", daemon=True),
                         threading.Thread(target=self._load_loop, name="kv-load", daemon=True)]
        for t in self._threads:
            t.start()

    # --- save -----------------------------------------------------------------------------------
    def save(self, jobs: list[SaveJob]) -> None:
        """Take the blocks of `jobs` off their pages without waiting (engine thread): on CUDA into
        device staging, and the saver thread leases their slots (an eviction that writes a block
        down to a lower tier, or a daemon's round trip, happens there), copies them in and commits
        them; on CPU straight into slots leased here."""
        wanted = sum(len(job.keys) for job in jobs)
        slots = None if self.cuda else self.store.allocate(wanted)
        room = self.copies.room_for_save(wanted) if self.cuda else len(slots)
        self.metrics.inc(self.metrics.dropped_saves, wanted - room)
        kept = _truncate(jobs, room, self.ppb)
        if not kept:
            return
        start = time.perf_counter()
        gathered = self.copies.gather([p for job in kept for p in job.page_ids], slots)
        self._saves.put(_Save(kept, gathered, start))

    def _save_loop(self) -> None:
        while (save := self._saves.get()) is not None:
            try:
                self._commit(save)
            except Exception:  # noqa: BLE001 - a failed save is skipped, never fatal
                logger.exception("committing %d saved block(s) failed", len(save.gathered.slots))
                self.metrics.inc(self.metrics.store_errors, op="put")
                self.store.release(save.gathered.slots)
            finally:
                self._saves.task_done()

    def _commit(self, save: _Save) -> None:
        gathered = save.gathered
        jobs = save.jobs
        if gathered.staging is not None:
            wanted = gathered.staging.shape[0]
            gathered.slots = self.store.allocate(wanted)
            self.metrics.inc(self.metrics.dropped_saves, wanted - len(gathered.slots))
            jobs = _truncate(jobs, len(gathered.slots), self.ppb)
            # The clock starts when the blocks are off the pages: the gather waits for the step's
            # forward, which is not the save's cost.
            started = self.copies.copy_out(gathered)
        else:
            started = save.started
        sums = gathered.sums.tolist()
        first = 0
        for job in jobs:
            n = len(job.keys)
            self._commit_job(job, gathered.slots[first:first + n], sums[first:first + n])
            first += n
        self.metrics.observe(self.metrics.save_seconds, time.perf_counter() - started)

    def _commit_job(self, job: SaveJob, slots: list[int], sums: list[int]) -> None:
        expires_at = time.time() + job.ttl_s if job.ttl_s is not None else None
        checksums = [s ^ block_tag(self.namespace, key, self.block_bytes, expires_at) for key, s in zip(job.keys, sums)]
        stored = self.store.commit(self.namespace, job.keys, slots, checksums, expires_at, job.tiers)
        self.metrics.count_saved(stored, len(slots), self.block_bytes)

    def flush(self, timeout: float) -> bool:
        """Wait until every issued save is committed (or failed); False on timeout."""
        return wait_drained(self._saves, timeout)

    # --- load -----------------------------------------------------------------------------------
    def start_load(self, job: LoadJob) -> None:
        """Queue a load into `job.page_ids` (engine thread, at admission)."""
        ready_after = None
        if self.cuda:
            ready_after = torch.cuda.Event()
            ready_after.record()
        load = _Load(job, ready_after)
        with self._lock:
            self._pending[job.request_id] = load
        self._loads.put(load)

    def cancel_load(self, request_id: str) -> None:
        """Forget a load; its pages are free again once this returns (the copies cannot touch them later)."""
        with self._lock:
            load = self._pending.pop(request_id, None)
            if load is None:
                return
            load.cancelled = True
            if load.event is not None:
                # Copies may still be writing the pages: later compute work must wait for them.
                torch.cuda.current_stream(self.device).wait_event(load.event)

    @property
    def num_pending_loads(self) -> int:
        return len(self._pending)

    def _load_loop(self) -> None:
        while (load := self._loads.get()) is not None:
            if isinstance(load, _Release):
                self.store.release(load.slots)
                continue
            try:
                self._fetch(load)
            except Exception:  # noqa: BLE001 - a failed load is recomputed
                logger.exception("loading %d block(s) for %s failed", len(load.job.keys), load.job.request_id)
                self.metrics.inc(self.metrics.store_errors, op="get")
                self.store.release([b.slot for b in load.blocks])
                load.blocks, load.ok, load.event = [], None, None
            with self._issued_changed:
                self._issued.append(load)
                self._issued_changed.notify_all()

    def _fetch(self, load: _Load) -> None:
        job = load.job
        load.blocks = self.store.acquire(self.namespace, job.keys)
        load.fetched_s = time.perf_counter()
        if not load.blocks:
            return
        keys = job.keys[:len(load.blocks)]
        expected = [b.checksum ^ block_tag(self.namespace, key, self.block_bytes, b.expires_at)
                    for key, b in zip(keys, load.blocks)]
        skip = job.skip_pages
        # A block the GPU prefix cache partly holds is checked where it rests, on the host: its
        # pages on the device would mix cached and loaded bytes.
        first = 1 if skip and self.cuda else 0
        if first:
            load.head_ok = self.store.verify_host(self.namespace, keys[0], load.blocks[0].slot,
                                                  load.blocks[0].checksum, load.blocks[0].expires_at)
        slots = [b.slot for b in load.blocks]
        page_ids = job.page_ids[:len(slots) * self.ppb]
        chunks = self.copies.load_chunks(self._load_stream, slots, page_ids, skip)
        in_flight: deque = deque()
        while True:
            # Each block is enqueued under the lock, so a cancelled load enqueues nothing more and
            # `cancel_load` knows the last event its pages must wait for.
            with self._lock:
                if load.cancelled or next(chunks, _DONE) is _DONE:
                    break
                load.event = self._record()
            if load.event is not None:
                in_flight.append(load.event)
                if len(in_flight) > _LOAD_BLOCKS_IN_FLIGHT:
                    in_flight.popleft().synchronize()
        with self._lock:
            if load.cancelled:
                return
            load.ok = self.copies.verify(self._load_stream, slots, page_ids[first * self.ppb:], expected[first:])
            load.event = self._record()
        load.issued_s = time.perf_counter()

    def _record(self) -> torch.cuda.Event | None:
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(self._load_stream)
        return event

    def wait_for_load(self, timeout: float) -> None:
        """Block until some load is done (or `timeout`); lets an idle engine avoid spinning."""
        with self._issued_changed:
            self._issued_changed.wait_for(lambda: bool(self._issued) or not self._pending, timeout)
            first = self._issued[0] if self._issued else None
        if first is not None and first.event is not None:
            first.event.synchronize()

    def finish_loads(self) -> list[LoadResult]:
        """Loads whose blocks are in their pages and verified (engine thread, before the next step)."""
        with self._lock:
            done = [load for load in self._issued if load.event is None or load.event.query()]
            if not done:
                return []
            self._issued = [load for load in self._issued if load not in done]
            return [result for load in done if (result := self._finish(load)) is not None]

    def _finish(self, load: _Load) -> LoadResult | None:
        job = load.job
        if load.blocks:
            self._loads.put(_Release([b.slot for b in load.blocks]))
        if self._pending.pop(job.request_id, None) is None:
            return None   # cancelled
        ok = ([load.head_ok] if load.head_ok is not None else []) + (load.ok.tolist() if load.ok is not None else [])
        n = next((i for i, good in enumerate(ok) if not good), len(ok))
        if n < len(ok):
            self.metrics.inc(self.metrics.corrupt_blocks)
            logger.warning("block %d of %s's load failed its checksum; it is recomputed and the copy deleted",
                           n, job.request_id)
            self.store.delete(self.namespace, [job.keys[n]])
        now = time.perf_counter()
        self.metrics.inc(self.metrics.bytes_loaded, n * self.block_bytes)
        self.metrics.observe(self.metrics.load_seconds, now - job.started)
        if load.blocks:
            self._observe_phases(load, now)
        if n:
            self._observe_rates(load, n, now)
        return LoadResult(job.request_id, n)

    def _observe_rates(self, load: _Load, n: int, now: float) -> None:
        """Each tier's share of the load's time, for the load-or-recompute model: every block was
        copied out of the slab; blocks from below were first fetched into it."""
        tiers = load.job.tiers[:n]
        slab = self.store.tier_names[0] if self.store.has_memory_tier else None
        copy_s, fetch_s = now - load.fetched_s, load.fetched_s - load.job.started
        below = sum(t != slab for t in tiers)
        for tier in set(tiers):
            m = tiers.count(tier)
            seconds = copy_s * m / n + (0.0 if tier == slab else fetch_s * m / below)
            self.cost.observe_load(tier, m * self.block_bytes, seconds)

    def _observe_phases(self, load: _Load, now: float) -> None:
        job = load.job
        phases = {"fetch": load.fetched_s - job.started, "copy": load.issued_s - load.fetched_s,
                  "verify": now - load.issued_s}
        for phase, seconds in phases.items():
            self.metrics.observe_phase(phase, seconds)
        logger.info("loaded %d block(s) (%.1f MiB) for %s in %.1f ms: fetch %.1f, copy %.1f, verify %.1f",
                    len(load.blocks), len(load.blocks) * self.block_bytes / 2**20, job.request_id,
                    (now - job.started) * 1e3, *(v * 1e3 for v in phases.values()))

    def close(self, drain_timeout: float = 10.0) -> None:
        """Commit the saves already issued (up to `drain_timeout` s), then stop both threads."""
        if not self.flush(drain_timeout):
            logger.warning("closing with %d save batch(es) not yet committed; they are dropped",
                           self._saves.unfinished_tasks)
        self._saves.put(None)
        self._loads.put(None)
        for t in self._threads:
            t.join(timeout=5)
