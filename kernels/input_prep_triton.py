"""GPU-side input preparation: the Triton kernel (one program per scheduled request)."""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.input_prep import StepTensors


@triton.jit
def _prepare_inputs_kernel(
    block_tables_ptr, computed_ptr, token_ids_ptr, req_ptr, qsl_ptr,
    input_ids_ptr, positions_ptr, slots_ptr,
    block_size, stride_bt, stride_tok,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    req = tl.load(req_ptr + b).to(tl.int64)
    start = tl.load(qsl_ptr + b)
    count = tl.load(qsl_ptr + b + 1) - start
    computed = tl.load(computed_ptr + req).to(tl.int64)
    for i in range(0, count, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < count
        pos = computed + offs
        block = tl.load(block_tables_ptr + req * stride_bt + pos // block_size, mask=mask, other=0).to(tl.int64)
        token = tl.load(token_ids_ptr + req * stride_tok + pos, mask=mask, other=0)
        out = start + offs
        tl.store(input_ids_ptr + out, token.to(tl.int64), mask=mask)
        tl.store(positions_ptr + out, pos, mask=mask)
        tl.store(slots_ptr + out, block * block_size + pos % block_size, mask=mask)


def prepare_inputs_triton(
    block_tables: Tensor,
    num_computed_tokens: Tensor,
    token_ids: Tensor,
    req_indices: Tensor,
    num_scheduled_tokens: Tensor,
    block_size: int,
    num_tokens: int,
    num_tokens_padded: int | None = None,
) -> StepTensors:
    """Same contract as ``kernels.input_prep.prepare_inputs_ref``."""
    device = token_ids.device
    padded = num_tokens if num_tokens_padded is None else num_tokens_padded
    num_reqs = req_indices.shape[0]
    qsl = torch.zeros(num_reqs + 1, dtype=torch.int32, device=device)
    torch.cumsum(num_scheduled_tokens, 0, out=qsl[1:])
    input_ids = torch.zeros(padded, dtype=torch.int64, device=device)
    positions = torch.zeros(padded, dtype=torch.int64, device=device)
    slot_mapping = torch.full((padded,), -1, dtype=torch.int64, device=device)
    if num_reqs:
        _prepare_inputs_kernel[(num_reqs,)](
            block_tables, num_computed_tokens, token_ids, req_indices, qsl,
            input_ids, positions, slot_mapping,
            block_size, block_tables.stride(0), token_ids.stride(0),
            BLOCK=128, num_warps=4,
        )
    seq_lens = num_computed_tokens.index_select(0, req_indices.long()) + num_scheduled_tokens
    return StepTensors(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        query_start_loc=qsl,
        seq_lens=seq_lens.to(torch.int32),
        block_tables=block_tables.index_select(0, req_indices.long()),
    )
