"""GPU-side input preparation: one step's flat model inputs from per-request state kept on the device.

The runner keeps, per request slot r: its block table row, how many of its tokens already have KV
(``num_computed_tokens[r]``) and its token ids (prompt + sampled so far). Each step the scheduler
only says which request slots run and how many tokens each computes; everything per token is derived
on the device, without host round trips. This is the plain-PyTorch reference.
"""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class StepTensors:
    """Flat inputs of one forward pass (T tokens, padded to ``num_tokens_padded``; B requests).

    Padding tokens have input id 0, position 0 and slot -1 (their K/V is never stored).
    """

    input_ids: Tensor        # [T_pad] int64
    positions: Tensor        # [T_pad] int64
    slot_mapping: Tensor     # [T_pad] int64
    query_start_loc: Tensor  # [B+1] int32
    seq_lens: Tensor         # [B] int32
    block_tables: Tensor     # [B, M] int32, the scheduled requests' rows


def prepare_inputs_ref(
    block_tables: Tensor,
    num_computed_tokens: Tensor,
    token_ids: Tensor,
    req_indices: Tensor,
    num_scheduled_tokens: Tensor,
    block_size: int,
    num_tokens: int,
    num_tokens_padded: int | None = None,
) -> StepTensors:
    """Build the step's inputs for requests ``req_indices`` [B] computing ``num_scheduled_tokens`` [B].

    ``block_tables`` [R, M] int32, ``num_computed_tokens`` [R] int32 and ``token_ids`` [R, max_len]
    are per-request-slot state; ``num_tokens`` = sum(num_scheduled_tokens), known to the scheduler
    (passing it avoids reading the device). Request b's token i sits at position
    ``num_computed_tokens[r] + i`` with ``r = req_indices[b]``.
    """
    device = token_ids.device
    padded = num_tokens if num_tokens_padded is None else num_tokens_padded
    reqs = req_indices.long()
    counts = num_scheduled_tokens.long()
    computed = num_computed_tokens.long()[reqs]
    qsl = torch.zeros(reqs.shape[0] + 1, dtype=torch.int32, device=device)
    torch.cumsum(counts, 0, out=qsl[1:])

    # For each token: its request's row b, then its offset within that request's new tokens.
    row = torch.repeat_interleave(torch.arange(reqs.shape[0], device=device), counts, output_size=num_tokens)
    offset = torch.arange(num_tokens, device=device) - qsl[:-1].long()[row]
    pos = computed[row] + offset
    slot_req = reqs[row]
    blocks = block_tables.long()[slot_req, torch.div(pos, block_size, rounding_mode="floor")]

    input_ids = torch.zeros(padded, dtype=torch.int64, device=device)
    positions = torch.zeros(padded, dtype=torch.int64, device=device)
    slot_mapping = torch.full((padded,), -1, dtype=torch.int64, device=device)
    input_ids[:num_tokens] = token_ids[slot_req, pos]
    positions[:num_tokens] = pos
    slot_mapping[:num_tokens] = blocks * block_size + pos % block_size
    return StepTensors(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        query_start_loc=qsl,
        seq_lens=(computed + counts).to(torch.int32),
        block_tables=block_tables.index_select(0, reqs),
    )
