"""The Triton paged-attention kernel against the reference (CPU interpreter here, compiled on a GPU)."""

import pytest
import torch
from paged_cases import make_paged_case
from triton_loader import DEVICE, load_triton_module

from kernels.paged_attention import paged_attention_ref

kernel = load_triton_module("kernels.paged_attention_triton")

MIXED = [(0, 7), (5, 1), (37, 9), (20, 1), (0, 1), (16, 16)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def check(case, dtype, num_splits=None):
    args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in case.args()]
    out = kernel.paged_attention_triton(*args, num_splits=num_splits)
    ref = paged_attention_ref(*case.args())
    assert out.dtype == dtype and out.shape == case.q.shape
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 1)])
def test_mixed_prefill_chunks_and_decodes(dtype, heads):
    check(make_paged_case(MIXED, heads[0], heads[1], 16, 16, dtype, seed=heads[0]), dtype)


@pytest.mark.parametrize("block_size", [32, 64, 256])
def test_block_sizes(block_size):
    case = make_paged_case([(70, 5), (3, 1), (300, 1)], 4, 2, 32, block_size, torch.float32, seed=block_size)
    check(case, torch.float32)


def test_decode_only_batch_and_odd_head_dim():
    case = make_paged_case([(9, 1), (40, 1), (0, 1), (130, 1)], 6, 3, 24, 16, torch.bfloat16, seed=7)
    check(case, torch.bfloat16)


def test_long_prefill_spans_several_query_tiles():
    case = make_paged_case([(8, 150), (33, 1)], 2, 1, 16, 16, torch.float32, num_layers=1, layer=0, seed=9)
    check(case, torch.float32)


@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keys_split_across_programs(num_splits, dtype):
    """A prefill tail over a long cached context (and a decode beside it) with the keys split: some
    splits of the short sequences get no keys at all and must weigh nothing."""
    case = make_paged_case([(300, 20), (3, 1), (40, 7)], 8, 2, 32, 16, dtype, seed=num_splits)
    check(case, dtype, num_splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_batch_with_keys_split(dtype):
    """The long-context decode graphs' variant: a decode-only batch, keys split 8 ways, one long
    context beside short ones (most of whose splits get no keys), as the runner captures it."""
    case = make_paged_case([(700, 1), (3, 1), (0, 1), (65, 1)], 8, 2, 32, 16, dtype, seed=11)
    check(case, dtype, 8)
