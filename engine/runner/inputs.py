"""Turn a scheduled step into the flat tensors one forward pass takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.core.scheduler import SchedulerOutput
from engine.models.attention import AttentionMetadata


@dataclass
class StepInputs:
    """Packed inputs of one step: every scheduled token of every request, back to back."""

    input_ids: torch.Tensor       # [T]
    positions: torch.Tensor       # [T]
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [S] row of the last token of each request that samples


def prepare_inputs(out: SchedulerOutput, block_tables: list[list[int]], block_size: int,
                   device: torch.device) -> StepInputs:
    """Build positions, slot mapping and sequence offsets with tensor ops, not per-token loops."""
    token_ids: list[int] = []
    for sr in out.scheduled:
        token_ids.extend(sr.request.all_token_ids[sr.start:sr.start + sr.num_tokens])
    num_tokens = torch.tensor([sr.num_tokens for sr in out.scheduled], dtype=torch.int64)
    starts = torch.tensor([sr.start for sr in out.scheduled], dtype=torch.int64)
    query_start_loc = torch.zeros(len(out.scheduled) + 1, dtype=torch.int64)
    torch.cumsum(num_tokens, 0, out=query_start_loc[1:])

    total = int(query_start_loc[-1])
    row = torch.repeat_interleave(torch.arange(len(out.scheduled)), num_tokens)
    positions = starts[row] + torch.arange(total) - query_start_loc[:-1][row]

    width = max(len(bt) for bt in block_tables)
    table = torch.zeros(len(block_tables), width, dtype=torch.int32)
    for i, bt in enumerate(block_tables):
        table[i, :len(bt)] = torch.tensor(bt, dtype=torch.int32)
    slot_mapping = table[row, positions // block_size].to(torch.int64) * block_size + positions % block_size

    seq_lens = starts + num_tokens
    sample_rows = torch.tensor([sr.sample for sr in out.scheduled], dtype=torch.bool)
    logits_indices = (query_start_loc[1:] - 1)[sample_rows]
    attn = AttentionMetadata(
        slot_mapping=slot_mapping.to(device),
        block_tables=table.to(device),
        seq_lens=seq_lens.to(torch.int32).to(device),
        query_start_loc=query_start_loc.to(torch.int32).to(device),
        max_query_len=int(num_tokens.max()),
        max_seq_len=int(seq_lens.max()),
    )
    return StepInputs(
        input_ids=torch.tensor(token_ids, dtype=torch.int64).to(device),
        positions=positions.to(device),
        attn=attn,
        logits_indices=logits_indices.to(device),
    )
