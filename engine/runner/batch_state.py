"""Per-request state that lives on the device across steps (MRV2 style).

Each running request owns a slot: a row of token ids, a row of its block table and its count of
computed tokens, all in device tensors updated in place. A step only sends what changed since the
last one — the rows of newly admitted requests, the block ids allocated since, and each scheduled
request's (slot, start, count) — packed into one pinned buffer and copied with one non-blocking
host-to-device transfer. Everything per token (input ids, positions, slot mapping) is derived on the
device by `kernels.prepare_inputs`. Sampled tokens are written into the token rows on the device,
so the next step reads them without the host ever seeing them first (async scheduling).

All device work is issued on the current stream, so a slot reused by a new request is rewritten
only after every earlier step that read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import torch

import kernels
from engine.core.block_pool import KVBlock
from engine.core.sched_output import SchedulerOutput
from engine.models.attention import AttentionMetadata


@dataclass
class PreparedStep:
    """A step's device inputs plus what the sampler and the write-back need."""

    input_ids: torch.Tensor       # [T_pad] int64
    positions: torch.Tensor       # [T_pad] int64
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [S] row of the last token of each sampling request
    sample_slots: torch.Tensor    # [S] slot of each sampling request
    sample_positions: torch.Tensor  # [S] where its sampled token goes in its token row
    num_tokens: int
    num_reqs: int


class BatchState:
    """Slots of device-resident request state and the per-step delta upload."""

    def __init__(self, max_num_seqs: int, max_model_len: int, block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        self.device = device
        max_blocks = -(-max_model_len // block_size)
        # One spare column: a request that ends at max_model_len still has its last token written back.
        self.token_ids = torch.zeros(max_num_seqs, max_model_len + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_num_seqs, max_blocks, dtype=torch.int32, device=device)
        self.num_computed = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)
        self._slot_of: dict[str, int] = {}
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))
        self._blocks_uploaded = [0] * max_num_seqs
        self._pin = device.type == "cuda"

    def release(self, request_ids: list[str]) -> None:
        """Free the slots of finished or preempted requests (a preempted one gets a fresh slot later)."""
        for rid in request_ids:
            slot = self._slot_of.pop(rid, None)
            if slot is not None:
                self._free_slots.append(slot)

    def prepare(self, out: SchedulerOutput, blocks_of: Callable[[str], list[KVBlock]],
                num_tokens_padded: int | None = None) -> PreparedStep:
        """Upload this step's changes and build its flat inputs on the device."""
        self.release(out.freed_request_ids + out.preempted)
        scheduled = out.scheduled
        # Comprehensions, not one loop of appends: at 256+ requests per decode step this is host
        # time on the critical path, and it must stay well under the GPU's step time.
        request_ids = [sr.request.request_id for sr in scheduled]
        slot_of = self._slot_of
        new_slots, new_lens, new_tokens = [], [], []
        if not all(rid in slot_of for rid in request_ids):
            for sr in scheduled:
                request = sr.request
                if request.request_id not in slot_of:
                    slot = self._free_slots.pop()
                    slot_of[request.request_id] = slot
                    self._blocks_uploaded[slot] = 0
                    new_slots.append(slot)
                    new_lens.append(request.num_tokens)
                    new_tokens.extend(request.all_token_ids)
        slots = [slot_of[rid] for rid in request_ids]
        starts = [sr.start for sr in scheduled]
        counts = [sr.num_tokens for sr in scheduled]
        sample_rows = [b for b, sr in enumerate(scheduled) if sr.sample]
        blocks = [blocks_of(rid) for rid in request_ids]
        uploaded = self._blocks_uploaded
        grown = [b for b, (slot, have) in enumerate(zip(slots, blocks)) if len(have) > uploaded[slot]]
        blk_slots = [slots[b] for b in grown]
        blk_cols = [uploaded[slot] for slot in blk_slots]
        blk_lens = [len(blocks[b]) - col for b, col in zip(grown, blk_cols)]
        blk_ids = [block.block_id for b, col in zip(grown, blk_cols) for block in blocks[b][col:]]
        for b in grown:
            uploaded[slots[b]] = len(blocks[b])

        parts = [slots, starts, counts, sample_rows, new_slots, new_lens, new_tokens,
                 blk_slots, blk_cols, blk_lens, blk_ids]
        packed = torch.tensor(list(chain.from_iterable(parts)), dtype=torch.int32)
        if self._pin:
            packed = packed.pin_memory()
        packed = packed.to(self.device, non_blocking=True)
        (slots_d, starts_d, counts_d, sample_d, new_slots_d, new_lens_d, new_tokens_d,
         blk_slots_d, blk_cols_d, blk_lens_d, blk_ids_d) = packed.split([len(p) for p in parts])

        if new_slots:
            self._scatter_rows(self.token_ids, new_slots_d, torch.zeros_like(new_slots_d), new_lens_d,
                               new_tokens_d, len(new_tokens))
        if blk_slots:
            self._scatter_rows(self.block_tables, blk_slots_d, blk_cols_d, blk_lens_d, blk_ids_d, len(blk_ids))
        self.num_computed.index_copy_(0, slots_d.long(), starts_d)

        num_tokens = out.num_batched_tokens
        st = kernels.prepare_inputs(self.block_tables, self.num_computed, self.token_ids, slots_d, counts_d,
                                    self.block_size, num_tokens, num_tokens_padded)
        attn = AttentionMetadata(
            slot_mapping=st.slot_mapping, block_tables=st.block_tables, seq_lens=st.seq_lens,
            query_start_loc=st.query_start_loc, max_query_len=max(counts),
            max_seq_len=max(map(int.__add__, starts, counts)))
        last_rows = (st.query_start_loc[1:] - 1).long()
        slots_long = slots_d.long()
        seq_lens = st.seq_lens.long()
        if len(sample_rows) < len(scheduled):
            sample_idx = sample_d.long()
            last_rows = last_rows.index_select(0, sample_idx)
            slots_long = slots_long.index_select(0, sample_idx)
            seq_lens = seq_lens.index_select(0, sample_idx)
        return PreparedStep(
            input_ids=st.input_ids, positions=st.positions, attn=attn, logits_indices=last_rows,
            sample_slots=slots_long, sample_positions=seq_lens, num_tokens=num_tokens, num_reqs=len(slots))

    def write_sampled(self, step: PreparedStep, token_ids: torch.Tensor) -> None:
        """Put each sampled token into its request's row, where the next step's input prep reads it."""
        self.token_ids[step.sample_slots, step.sample_positions] = token_ids.to(torch.int32)

    @staticmethod
    def _scatter_rows(table: torch.Tensor, rows: torch.Tensor, first_cols: torch.Tensor, lens: torch.Tensor,
                      values: torch.Tensor, total: int) -> None:
        """table[rows[i], first_cols[i] + j] = values[offset_i + j] for j < lens[i], all rows at once."""
        lens = lens.long()
        which = torch.repeat_interleave(torch.arange(rows.shape[0], device=rows.device), lens, output_size=total)
        offsets = torch.cumsum(lens, 0) - lens
        cols = first_cols.long()[which] + torch.arange(total, device=rows.device) - offsets[which]
        table[rows.long()[which], cols] = values
