"""GPU-side input preparation: the reference against hand-computed inputs, the Triton kernel against both."""

import torch
from triton_loader import DEVICE, load_triton_module

from kernels import prepare_inputs
from kernels.input_prep import prepare_inputs_ref

prepare_inputs_triton = load_triton_module("kernels.input_prep_triton").prepare_inputs_triton

BLOCK_SIZE = 4


def request_state():
    """Four request slots; slot 2 is idle this step."""
    block_tables = torch.tensor([[3, 7, 0, 0], [1, 0, 0, 0], [9, 9, 9, 9], [5, 2, 8, 6]], dtype=torch.int32)
    num_computed = torch.tensor([5, 0, 3, 14], dtype=torch.int32)
    token_ids = torch.arange(4 * 16, dtype=torch.int64).view(4, 16) + 1000
    return block_tables, num_computed, token_ids


def test_reference_builds_expected_inputs():
    block_tables, num_computed, token_ids = request_state()
    # Slot 3 decodes one token, slot 0 prefills a chunk of 3, slot 1 starts with 2 tokens.
    req = torch.tensor([3, 0, 1], dtype=torch.int32)
    sched = torch.tensor([1, 3, 2], dtype=torch.int32)
    out = prepare_inputs(block_tables, num_computed, token_ids, req, sched, BLOCK_SIZE, 6, num_tokens_padded=8)
    assert out.input_ids.tolist() == [1062, 1005, 1006, 1007, 1016, 1017, 0, 0]
    assert out.positions.tolist() == [14, 5, 6, 7, 0, 1, 0, 0]
    # position 14 of slot 3 -> block 6 offset 2; positions 5..7 of slot 0 -> block 7 offsets 1..3.
    assert out.slot_mapping.tolist() == [26, 29, 30, 31, 4, 5, -1, -1]
    assert out.query_start_loc.tolist() == [0, 1, 4, 6]
    assert out.seq_lens.tolist() == [15, 8, 2]
    assert out.block_tables.tolist() == [[5, 2, 8, 6], [3, 7, 0, 0], [1, 0, 0, 0]]


def test_triton_matches_reference():
    gen = torch.Generator().manual_seed(0)
    num_slots, max_blocks, block_size = 6, 20, 16
    block_tables = torch.randint(0, 500, (num_slots, max_blocks), generator=gen, dtype=torch.int32)
    num_computed = torch.tensor([0, 37, 100, 5, 250, 0], dtype=torch.int32)
    token_ids = torch.randint(0, 32000, (num_slots, max_blocks * block_size), generator=gen)
    req = torch.tensor([4, 1, 0, 2, 5], dtype=torch.int32)
    sched = torch.tensor([1, 200, 130, 1, 3], dtype=torch.int32)
    num_tokens = int(sched.sum())
    ref = prepare_inputs_ref(block_tables, num_computed, token_ids, req, sched, block_size, num_tokens, 400)
    ours = prepare_inputs_triton(block_tables.to(DEVICE), num_computed.to(DEVICE), token_ids.to(DEVICE),
                                 req.to(DEVICE), sched.to(DEVICE), block_size, num_tokens, 400)
    for field in ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        assert torch.equal(getattr(ours, field).cpu(), getattr(ref, field)), field
