"""Byte movement between KV pages and slab slots, with the checksums computed where the bytes land.

On CUDA every copy goes through a device staging buffer, so the host issues one copy per run of
consecutive slots (and one gather or scatter per chunk of blocks) instead of one per page: a
32k-token prompt is 2048 pages of 1.75 MiB, and issuing 2048 copies held the Python interpreter for
~40 ms, stalling the decodes of every other request. The staging is two halves used in turn, so
one chunk crosses PCIe while the next is gathered or scattered; a half is reused only after the
copies out of it finished (a device-side wait, never a host one).

Save: checksums over the pages, then per chunk a gather into staging on the compute stream (so the
pages are read before any later forward can reuse them; the Triton page-copy kernel, at HBM speed,
where `index_select` over 1.75 MiB rows of bytes ran at ~350 GB/s) and the device-to-host copies on a side
stream (so decode steps do not wait for PCIe). Load: per chunk, host-to-device copies into staging
and a scatter into the pages, then the checksums over the destination pages, all on the load's
stream. On CPU the same moves are one `index_select`/`index_copy_` per block, synchronously.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels

# Device staging per direction: two halves of at most this many bytes each (8 blocks of Llama-3-8B's
# 32 MiB). Enough to keep PCIe busy while the other half is gathered at HBM speed.
STAGING_HALF_BYTES = 256 << 20


def slot_runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(first index, first slot, count) of each run of consecutive slots."""
    runs: list[tuple[int, int, int]] = []
    for i, slot in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == slot:
            first, start, count = runs[-1]
            runs[-1] = (first, start, count + 1)
        else:
            runs.append((i, slot, 1))
    return runs


class _Staging:
    """Two halves of device rows, one block each, taken in turn."""

    def __init__(self, block_bytes: int, device: torch.device) -> None:
        rows = max(1, STAGING_HALF_BYTES // block_bytes)
        self.rows = torch.empty((2, rows, block_bytes), dtype=torch.uint8, device=device)
        self.rows_per_half = rows
        self._free: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def take(self, stream: torch.cuda.Stream) -> tuple[int, torch.Tensor]:
        """A half for `stream` to write into, once the copies out of its last use are done."""
        half, self._turn = self._turn, self._turn ^ 1
        if self._free[half] is not None:
            stream.wait_event(self._free[half])
        return half, self.rows[half]

    def give_back(self, half: int, stream: torch.cuda.Stream) -> None:
        event = torch.cuda.Event()
        event.record(stream)
        self._free[half] = event


@dataclass
class IssuedSave:
    """A save whose copies are enqueued: the data checksums reach `sums` (host) by `done`."""

    sums: torch.Tensor
    done: torch.cuda.Event | None
    started: torch.cuda.Event | None


class SlabCopies:
    """Moves whole blocks (`ppb` pages each) between the paged KV cache and slab rows."""

    def __init__(self, kv_cache: torch.Tensor, slab_rows: torch.Tensor, pages_per_block: int) -> None:
        self.kv_cache = kv_cache
        self.ppb = pages_per_block
        self.page_bytes = kv_cache[0].numel() * kv_cache.element_size()
        self.kv_pages = kv_cache.view(kv_cache.shape[0], -1).view(torch.uint8)
        self.slab_rows = slab_rows
        self.cuda = kv_cache.is_cuda
        if self.cuda:
            block_bytes = self.page_bytes * pages_per_block
            self._copy_stream = torch.cuda.Stream(kv_cache.device)
            self._save_staging = _Staging(block_bytes, kv_cache.device)
            self._load_staging = _Staging(block_bytes, kv_cache.device)

    def device_ids(self, ids: list[int]) -> torch.Tensor:
        """Indices on the cache's device; on CUDA through pinned memory, so the host never waits."""
        t = torch.tensor(ids, dtype=torch.int64)
        return t.pin_memory().to(self.kv_cache.device, non_blocking=True) if self.cuda else t

    def _as_pages(self, rows: torch.Tensor) -> torch.Tensor:
        """Block rows of bytes as the cache's pages: [n * ppb, L, 2, page tokens, Hk, D]."""
        return rows.view(self.kv_cache.dtype).view(-1, *self.kv_cache.shape[1:])

    def _block_pages(self, slot: int) -> torch.Tensor:
        return self.slab_rows[slot].view(self.ppb, self.page_bytes)

    # --- save -----------------------------------------------------------------------------------
    def save(self, page_ids: list[int], slots: list[int]) -> IssuedSave:
        """Copy the blocks made of `page_ids` into `slots`; their data checksums come with them."""
        ids = self.device_ids(page_ids)
        if not self.cuda:
            sums = kernels.block_checksums(self.kv_cache, ids, self.ppb)
            for i, slot in enumerate(slots):
                torch.index_select(self.kv_pages, 0, ids[i * self.ppb:(i + 1) * self.ppb], out=self._block_pages(slot))
            return IssuedSave(sums, None, None)
        compute = torch.cuda.current_stream(self.kv_cache.device)
        started = torch.cuda.Event(enable_timing=True)
        started.record(compute)
        sums = kernels.block_checksums(self.kv_cache, ids, self.ppb)
        host_sums = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
        per_chunk = self._save_staging.rows_per_half
        for first in range(0, len(slots), per_chunk):
            chunk = slots[first:first + per_chunk]
            half, rows = self._save_staging.take(compute)
            pages = ids[first * self.ppb:(first + len(chunk)) * self.ppb]
            kernels.gather_blocks(self.kv_cache, pages, out=self._as_pages(rows[:len(chunk)]))
            gathered = torch.cuda.Event()
            gathered.record(compute)
            self._copy_stream.wait_event(gathered)
            with torch.cuda.stream(self._copy_stream):
                if first == 0:
                    host_sums.copy_(sums, non_blocking=True)
                for i, slot, count in slot_runs(chunk):
                    self.slab_rows[slot:slot + count].copy_(rows[i:i + count], non_blocking=True)
            self._save_staging.give_back(half, self._copy_stream)
        sums.record_stream(self._copy_stream)
        ids.record_stream(self._copy_stream)
        done = torch.cuda.Event(enable_timing=True)
        done.record(self._copy_stream)
        return IssuedSave(host_sums, done, started)

    # --- load -----------------------------------------------------------------------------------
    def load(self, stream: torch.cuda.Stream | None, slots: list[int], page_ids: list[int], skip_pages: int,
             checked_ids: list[int], expected: list[int]) -> torch.Tensor:
        """Copy `slots` into `page_ids` (the first `skip_pages` pages excepted: the GPU holds them) and
        compare the data checksums of the blocks made of `checked_ids` with `expected`.

        CUDA: enqueued on `stream`; the result (a bool per checked block) is pinned host memory
        valid once an event recorded on `stream` afterwards has completed. CPU: done on return (the
        source slots are checked, before the copy).
        """
        if not self.cuda:
            slot_pages = [slot * self.ppb + j for slot in slots for j in range(self.ppb)]
            ok = kernels.block_checksums(self.slab_rows.view(-1, self.page_bytes), torch.tensor(slot_pages),
                                         self.ppb) == torch.tensor(expected, dtype=torch.int64)
            for i, slot in enumerate(slots):
                start = max(skip_pages - i * self.ppb, 0)
                dst = torch.tensor(page_ids[i * self.ppb + start:(i + 1) * self.ppb])
                self.kv_pages.index_copy_(0, dst, self._block_pages(slot)[start:])
            return ok
        with torch.cuda.stream(stream):
            dst_ids = self.device_ids(page_ids)
            per_chunk = self._load_staging.rows_per_half
            for first in range(0, len(slots), per_chunk):
                chunk = slots[first:first + per_chunk]
                half, rows = self._load_staging.take(stream)
                for i, slot, count in slot_runs(chunk):
                    rows[i:i + count].copy_(self.slab_rows[slot:slot + count], non_blocking=True)
                start = max(skip_pages - first * self.ppb, 0)
                kernels.scatter_blocks(self.kv_cache, dst_ids[first * self.ppb + start:(first + len(chunk)) * self.ppb],
                                       self._as_pages(rows[:len(chunk)])[start:])
                self._load_staging.give_back(half, stream)
            ok = kernels.block_checksums(self.kv_cache, self.device_ids(checked_ids), self.ppb) == \
                self.device_ids(expected)
            host_ok = torch.empty(ok.shape, dtype=torch.bool, pin_memory=True)
            host_ok.copy_(ok, non_blocking=True)
        return host_ok
