"""Byte movement between KV pages and slab slots, with the checksums computed where the bytes are.

On CUDA every copy goes through device staging, so the host issues one copy per block instead of
one per page (a 32k-token prompt is 2048 pages of 1.75 MiB; issuing 2048 copies held the Python
interpreter for ~40 ms and stalled every other request's decode).

Save: on the compute stream (so the pages are read before any later forward can reuse them), the
checksums over the pages and one gather of every block into staging (the Triton page-copy kernel,
at HBM speed, where `index_select` over byte rows ran at ~350 GB/s); then the saver thread copies
the staging out block by block. Load: per block, a host-to-device copy into staging and a scatter
into the pages on the load's stream, then the checksums over the destination pages.

Transfers go one block at a time (~0.6 ms each) because the GPU's copy engines serve them in
order: a 1.75 GiB load enqueued at once held every decode step's own small copies behind it
(decode ITL p99 2.97 -> 23 ms with a 16k-token load in flight on an H200), and saves enqueued at
once added 4 ms to the decode steps they overlapped. On CPU the moves are plain `copy_`s of runs
of consecutive pages, synchronously (`index_select`/`index_copy_` over rows of bytes ran at 0.1-0.5
GB/s there), and the checksums are taken over the slots, where the bytes are contiguous, each on a
thread of its own while the next block is copied (one after the other, the copy and the sum of a
load took 1.8x the copy alone on two cores; side by side 1.15x).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

import kernels

def page_runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(first index, first id, count) of each run of consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    for i, page in enumerate(ids):
        if runs and runs[-1][1] + runs[-1][2] == page:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((i, page, 1))
    return runs


# Device staging of saves in flight, at most: beyond it a save is dropped (and counted), never waited for.
MAX_SAVE_STAGING_BYTES = 4 << 30


@dataclass
class GatheredSave:
    """A save whose blocks are gathered (CUDA: into `staging`, on the compute stream by `gathered`,
    their `slots` leased later by the saver thread); the data checksums reach `sums` (host) by then."""

    slots: list[int]
    sums: torch.Tensor
    staging: torch.Tensor | None = None
    gathered: torch.cuda.Event | None = None


class SlabCopies:
    """Moves whole blocks (`ppb` pages each) between the paged KV cache and slab rows."""

    def __init__(self, kv_cache: torch.Tensor, slab_rows: torch.Tensor, pages_per_block: int) -> None:
        self.kv_cache = kv_cache
        self.ppb = pages_per_block
        self.page_bytes = kv_cache[0].numel() * kv_cache.element_size()
        self.kv_pages = kv_cache.view(kv_cache.shape[0], -1).view(torch.uint8)
        self.slab_rows = slab_rows
        self.cuda = kv_cache.is_cuda
        self.block_bytes = self.page_bytes * pages_per_block
        self.staged_bytes = 0   # device staging held by saves in flight (engine and saver threads)
        self._staged_lock = threading.Lock()
        if self.cuda:
            self._copy_stream = torch.cuda.Stream(kv_cache.device)
            self._load_row = torch.empty((1, self.block_bytes), dtype=torch.uint8, device=kv_cache.device)
        else:
            self._summer = ThreadPoolExecutor(1, thread_name_prefix="kv-checksum")
            self._load_sums: tuple[list[int], list[Future]] | None = None   # the last whole load's

    def device_ids(self, ids: list[int]) -> torch.Tensor:
        """Indices on the cache's device; on CUDA through pinned memory, so the host never waits."""
        t = torch.tensor(ids, dtype=torch.int64)
        return t.pin_memory().to(self.kv_cache.device, non_blocking=True) if self.cuda else t

    def _as_pages(self, rows: torch.Tensor) -> torch.Tensor:
        """Block rows of bytes as the cache's pages: [n * ppb, L, 2, page tokens, Hk, D]."""
        return rows.view(self.kv_cache.dtype).view(-1, *self.kv_cache.shape[1:])

    def _slot_checksums(self, slots: list[int]) -> torch.Tensor:
        """Data checksums of whole slots, read in place (CPU)."""
        sums = [kernels.block_checksums(self.slab_rows[first:first + count], None, 1)
                for _, first, count in page_runs(slots)]
        return torch.cat(sums)

    def _block_pages(self, slot: int) -> torch.Tensor:
        return self.slab_rows[slot].view(self.ppb, self.page_bytes)

    def _copy_runs(self, pages: torch.Tensor, page_ids: list[int], block: torch.Tensor, first: int,
                   to_block: bool) -> None:
        """CPU: copy pages `page_ids` to (or from) `block`'s pages from `first` on, one run of
        consecutive pages at a time. numpy's copy runs on this thread alone, leaving the other core
        to the checksum thread (torch's copy would take both)."""
        pages_np, block_np = pages.numpy(), block.numpy()
        for j, page, count in page_runs(page_ids):
            run, slot_run = pages_np[page:page + count], block_np[first + j:first + j + count]
            if to_block:
                np.copyto(slot_run, run)
            else:
                np.copyto(run, slot_run)

    def _sum_later(self, slot: int) -> Future:
        return self._summer.submit(self._slot_checksums, [slot])

    # --- save -----------------------------------------------------------------------------------
    def room_for_save(self, count: int) -> int:
        """How many of `count` blocks the save staging can take now."""
        if not self.cuda:
            return count
        return max(0, min(count, (MAX_SAVE_STAGING_BYTES - self.staged_bytes) // self.block_bytes))

    def gather(self, page_ids: list[int], slots: list[int] | None) -> GatheredSave:
        """Take the blocks made of `page_ids` off the pages, with their data checksums (engine
        thread): on CPU straight into `slots`, on CUDA into device staging (`slots` None)."""
        if not self.cuda:
            sums = []
            for i, slot in enumerate(slots):
                self._copy_runs(self.kv_pages, page_ids[i * self.ppb:(i + 1) * self.ppb], self._block_pages(slot), 0,
                                to_block=True)
                sums.append(self._sum_later(slot))
            return GatheredSave(slots, torch.cat([f.result() for f in sums]))
        ids = self.device_ids(page_ids)
        sums = kernels.block_checksums(self.kv_cache, ids, self.ppb)
        staging = torch.empty((len(page_ids) // self.ppb, self.block_bytes), dtype=torch.uint8,
                              device=self.kv_cache.device)
        kernels.gather_blocks(self.kv_cache, ids, out=self._as_pages(staging))
        host_sums = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
        host_sums.copy_(sums, non_blocking=True)
        gathered = torch.cuda.Event()
        gathered.record()
        with self._staged_lock:
            self.staged_bytes += staging.numel()
        return GatheredSave([], host_sums, staging, gathered)

    def copy_out(self, save: GatheredSave) -> float:
        """Copy a gathered save's staging into its slots (the first `len(slots)` blocks), one block at
        a time (saver thread, CUDA), and free the staging; returns when the gather had finished
        (perf_counter), where the transfer's own time starts."""
        save.gathered.synchronize()
        start = time.perf_counter()
        for i, slot in enumerate(save.slots):
            with torch.cuda.stream(self._copy_stream):
                self.slab_rows[slot:slot + 1].copy_(save.staging[i:i + 1], non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._copy_stream)
            done.synchronize()
        with self._staged_lock:
            self.staged_bytes -= save.staging.numel()
        save.staging = None   # copied out, synchronized: the allocator may reuse it
        return start

    # --- load -----------------------------------------------------------------------------------
    def load_chunks(self, stream: torch.cuda.Stream | None, slots: list[int], page_ids: list[int],
                    skip_pages: int) -> Iterator[None]:
        """Copy `slots` into `page_ids` (the first `skip_pages` pages excepted: the GPU holds them), one
        block each time the caller advances the iterator (on CUDA: enqueued on `stream`).

        The caller waits for each block before it asks for the next (the module docstring says why).
        """
        dst_ids = self.device_ids(page_ids) if self.cuda else None
        sums = []
        for i, slot in enumerate(slots):
            start = max(skip_pages - i * self.ppb, 0)
            if not self.cuda:
                sums.append(self._sum_later(slot))
                self._copy_runs(self.kv_pages, page_ids[i * self.ppb + start:(i + 1) * self.ppb],
                                self._block_pages(slot), start, to_block=False)
                if i == len(slots) - 1:
                    self._load_sums = (list(slots), sums)
                yield
                continue
            with torch.cuda.stream(stream):
                # One staging row: the caller waits for each block, so the row is free again.
                self._load_row.copy_(self.slab_rows[slot:slot + 1], non_blocking=True)
                kernels.scatter_blocks(self.kv_cache, dst_ids[i * self.ppb + start:(i + 1) * self.ppb],
                                       self._as_pages(self._load_row)[start:])
            yield

    def verify(self, stream: torch.cuda.Stream | None, slots: list[int], checked_ids: list[int],
               expected: list[int]) -> torch.Tensor:
        """Whether each block made of pages `checked_ids` has the data checksum in `expected`.

        CUDA: over the destination pages, enqueued on `stream`; the result is pinned host memory,
        valid once an event recorded on `stream` afterwards has completed. CPU: over the source
        `slots` (a host copy cannot corrupt), done on return.
        """
        if not self.cuda:
            done, self._load_sums = self._load_sums, None
            sums = (torch.cat([f.result() for f in done[1]]) if done is not None and done[0] == list(slots)
                    else self._slot_checksums(slots))
            return sums == torch.tensor(expected, dtype=torch.int64)
        with torch.cuda.stream(stream):
            ok = kernels.block_checksums(self.kv_cache, self.device_ids(checked_ids), self.ppb) == \
                self.device_ids(expected)
            host_ok = torch.empty(ok.shape, dtype=torch.bool, pin_memory=True)
            host_ok.copy_(ok, non_blocking=True)
        return host_ok
