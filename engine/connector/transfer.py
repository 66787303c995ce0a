"""The worker side of offloading through a remote kvstore daemon: KV pages to and from gRPC payloads.

Save: one gather packs the pages of every block completed this step into a staging buffer, an
async device-to-host copy on a side stream lands it in pinned host memory, and a background
sender hands it to the store. The queue is bounded by a fixed ring of host slots: when the store
is slow, the newest saves are dropped and counted, and the step never waits. The gather runs on
the compute stream, so it reads the pages before any later forward can reuse them (a page freed
at the end of this step may be handed to another request in the next one).

Load: a background fetcher reads the blocks from the store into host memory; the engine thread
then copies them into their pages with one scatter at the start of a step, so the copy is ordered
before the forward that reads them (on a GPU: the same stream) and no page is written while a
forward could be reading it.

A daemon on the engine's host is not reached this way when its memory tier is a slab: the engine
maps the slab and `SlabTransfer` DMAs blocks into its slots (engine/connector/daemon_slab_store.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from engine.connector.cost_model import CostModel
from engine.connector.jobs import LoadJob, LoadResult, SaveJob, wait_drained
from engine.connector.metrics import ConnectorMetrics
from engine.connector.store_backend import BlockStore
from kernels import gather_blocks, scatter_blocks

logger = logging.getLogger(__name__)

# How long a CPU load waits for a reused staging buffer before it takes a fresh one.
_LOAD_BUFFER_WAIT_S = 1.0
# CPU loads stage through reused host buffers: torch's CPU allocator gives blocks this large back to
# the OS, so a fresh staging tensor page-faults on every load (measured: copying 15 blocks, 177 MB, into
# a fresh tensor 242 ms, into a reused one 25 ms). Two let one load be fetched while another is copied
# into its pages. (CUDA needs none: torch caches pinned host memory itself.)
_CPU_LOAD_BUFFERS = 2


@dataclass
class _StagingLease:
    """A reused CPU load buffer, given back to its pool once the scatter out of it is done."""

    buffer: torch.Tensor
    pool: queue.Queue

    def release(self) -> None:
        self.pool.put(self.buffer)


class BlockTransfer:
    """Background save and load of whole blocks (`pages_per_block` pages each)."""

    def __init__(self, kv_cache: torch.Tensor, store: BlockStore, namespace: str, pages_per_block: int,
                 metrics: ConnectorMetrics, max_pending_saves: int, cost: CostModel) -> None:
        self.kv_cache = kv_cache
        self.cost = cost
        self.store = store
        self.namespace = namespace
        self.pages_per_block = pages_per_block
        self.metrics = metrics
        self.page_shape = tuple(kv_cache.shape[1:])
        self.block_bytes = pages_per_block * kv_cache[0].numel() * kv_cache.element_size()
        self.cuda = kv_cache.is_cuda
        self._side_stream = torch.cuda.Stream(kv_cache.device) if self.cuda else None
        self._free_slots: queue.Queue[int] = queue.Queue()
        self._num_slots = max_pending_saves
        for i in range(max_pending_saves):
            self._free_slots.put(i)
        self._slots: torch.Tensor | None = None   # the pinned ring, allocated on first use
        self._saves: queue.Queue = queue.Queue()
        self._loads: queue.Queue = queue.Queue()
        self._loaded: queue.Queue = queue.Queue()
        self._pending_loads: dict[str, LoadJob] = {}
        self._load_buffers: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(0 if self.cuda else _CPU_LOAD_BUFFERS):
            self._load_buffers.put(torch.empty(0, dtype=torch.uint8))   # grown to the first load's size
        self._threads = [threading.Thread(target=self._send_loop, name="kv-save", daemon=True),
                         threading.Thread(target=self._fetch_loop, name="kv-load", daemon=True)]
        for t in self._threads:
            t.start()

    def _ring(self) -> torch.Tensor:
        # One pinned block per slot, so each D2H copy runs at full PCIe speed into memory we own.
        # Allocated on first use (CUDA only: the CPU path sends the gathered tensor itself).
        if self._slots is None:
            self._slots = torch.empty((self._num_slots, self.block_bytes), dtype=torch.uint8, pin_memory=True)
        return self._slots

    # --- save -----------------------------------------------------------------------------------
    def save(self, jobs: list[SaveJob]) -> None:
        """Stage the blocks of `jobs` for the store without waiting for it; called after a step."""
        staged: list[tuple[SaveJob, list[int]]] = []
        dropped = 0
        for job in jobs:
            slots = []
            for _ in job.keys:
                try:
                    slots.append(self._free_slots.get_nowait())
                except queue.Empty:
                    break
            dropped += len(job.keys) - len(slots)
            if slots:
                staged.append((SaveJob(job.keys[:len(slots)], job.page_ids[:len(slots) * self.pages_per_block],
                                       job.tiers, job.ttl_s), slots))
        self.metrics.inc(self.metrics.dropped_saves, dropped)
        if not staged:
            return
        page_ids = [p for job, _ in staged for p in job.page_ids]
        slot_ids = [s for _, slots in staged for s in slots]
        ids = torch.tensor(page_ids, dtype=torch.int64, device=self.kv_cache.device)
        event = None
        if self.cuda:
            packed = gather_blocks(self.kv_cache, ids).view(len(slot_ids), -1).view(torch.uint8)
            ring = self._ring()
            self._side_stream.wait_stream(torch.cuda.current_stream(self.kv_cache.device))
            with torch.cuda.stream(self._side_stream):
                for row, slot in enumerate(slot_ids):
                    ring[slot].copy_(packed[row], non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._side_stream)
            packed.record_stream(self._side_stream)
            payload = ring
            rows = slot_ids
        else:
            payload = gather_blocks(self.kv_cache, ids).view(len(slot_ids), -1).view(torch.uint8)
            rows = list(range(len(slot_ids)))
        self._saves.put(partial(self._send, staged, slot_ids, payload, rows, event))

    def _send_loop(self) -> None:
        while True:
            send = self._saves.get()
            try:
                if send is None:
                    return
                send()
            finally:
                self._saves.task_done()

    def _send(self, staged: list[tuple[SaveJob, list[int]]], slot_ids: list[int], payload: torch.Tensor,
              rows: list[int], event) -> None:
        if event is not None:
            event.synchronize()
        it = iter(rows)
        try:
            for job, _ in staged:
                blocks = [(key, payload[next(it)].numpy().tobytes()) for key in job.keys]
                self._store_blocks(len(blocks), lambda: self.store.put(self.namespace, blocks, tiers=job.tiers,
                                                                       ttl_s=job.ttl_s))
        finally:
            for s in slot_ids:
                self._free_slots.put(s)

    def _store_blocks(self, count: int, put: Callable[[], int]) -> None:
        """Run one put of `count` blocks and count what came of it."""
        start = time.perf_counter()
        try:
            stored = put()
        except Exception as e:  # noqa: BLE001 - a failed save is skipped, never fatal
            self.metrics.inc(self.metrics.store_errors, op="put")
            logger.warning("saving %d block(s) to the store failed: %s", count, e)
            return
        self.metrics.observe(self.metrics.save_seconds, time.perf_counter() - start)
        self.metrics.count_saved(stored, count, self.block_bytes)

    def flush(self, timeout: float) -> bool:
        """Wait until every staged save has reached the store (or failed); False on timeout."""
        return wait_drained(self._saves, timeout)

    # --- load -----------------------------------------------------------------------------------
    def start_load(self, job: LoadJob) -> None:
        self._pending_loads[job.request_id] = job
        self._loads.put(job)

    def cancel_load(self, request_id: str) -> None:
        self._pending_loads.pop(request_id, None)

    @property
    def num_pending_loads(self) -> int:
        return len(self._pending_loads)

    def _fetch_loop(self) -> None:
        while True:
            job = self._loads.get()
            if job is None:
                return
            self._loaded.put((job, *self._fetch_copy(job)))

    def _fetch_copy(self, job: LoadJob) -> tuple[torch.Tensor | None, _StagingLease | None]:
        """The blocks, copied into host memory: fresh pinned memory on CUDA, a reused buffer on CPU
        (with the lease that gives it back)."""
        try:
            payloads = self.store.get(self.namespace, job.keys)
        except Exception as e:  # noqa: BLE001 - a failed load is recomputed
            self.metrics.inc(self.metrics.store_errors, op="get")
            logger.warning("loading %d block(s) for %s failed: %s", len(job.keys), job.request_id, e)
            payloads = []
        intact = []
        for payload in payloads:
            if payload is None or len(payload) != self.block_bytes:
                break
            intact.append(payload)
        if not intact:
            return None, None
        host, lease = self._staging(len(intact))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffers: copied out at once
            for i, payload in enumerate(intact):
                host[i].copy_(torch.frombuffer(payload, dtype=torch.uint8))
        return host, lease

    def _staging(self, n: int) -> tuple[torch.Tensor, _StagingLease | None]:
        """Host rows for `n` blocks; on CPU a pooled buffer unless both are still being copied out."""
        nbytes = n * self.block_bytes
        try:
            buffer = None if self.cuda else self._load_buffers.get(timeout=_LOAD_BUFFER_WAIT_S)
        except queue.Empty:
            buffer = None
        if buffer is None:
            return torch.empty((n, self.block_bytes), dtype=torch.uint8, pin_memory=self.cuda), None
        if buffer.numel() < nbytes:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        return buffer[:nbytes].view(n, self.block_bytes), _StagingLease(buffer, self._load_buffers)

    def wait_for_load(self, timeout: float) -> None:
        """Block until some load finishes (or `timeout`); lets an idle engine avoid spinning."""
        if self._pending_loads and self._loaded.empty():
            try:
                self._loaded.put(self._loaded.get(timeout=timeout))
            except queue.Empty:
                pass

    def finish_loads(self) -> list[LoadResult]:
        """Copy every fetched block into its pages (engine thread, before the next forward)."""
        results = []
        while True:
            try:
                job, host, lease = self._loaded.get_nowait()
            except queue.Empty:
                return results
            if self._pending_loads.pop(job.request_id, None) is None:
                if lease is not None:
                    lease.release()
                continue  # aborted while loading
            n = 0 if host is None else host.shape[0]
            if n:
                ppb = self.pages_per_block
                dtype = self.kv_cache.dtype
                src = host.view(dtype).view(n * ppb, *self.page_shape)[job.skip_pages:]
                pages = torch.tensor(job.page_ids[job.skip_pages:n * ppb], dtype=torch.int64,
                                     device=self.kv_cache.device)
                if len(pages):
                    scatter_blocks(self.kv_cache, pages, src.to(self.kv_cache.device, non_blocking=True))
                self.metrics.inc(self.metrics.bytes_loaded, n * self.block_bytes)
            if lease is not None:
                lease.release()   # the CPU scatter is synchronous: the buffer is free again
            elapsed = time.perf_counter() - job.started
            self.metrics.observe(self.metrics.load_seconds, elapsed)
            if n and job.tiers:
                self.cost.observe_load(job.tiers[0], n * self.block_bytes, elapsed)
            results.append(LoadResult(job.request_id, n))

    def close(self, drain_timeout: float = 10.0) -> None:
        """Send the saves already staged (up to `drain_timeout` s), then stop both threads."""
        if not self.flush(drain_timeout):
            logger.warning("closing with %d save batch(es) not yet sent; they are dropped",
                           self._saves.unfinished_tasks)
        self._saves.put(None)
        self._loads.put(None)
        for t in self._threads:
            t.join(timeout=5)
