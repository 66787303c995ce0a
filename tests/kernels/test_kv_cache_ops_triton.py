"""Triton KV write and block gather/scatter against their references (CPU interpreter here)."""

import pytest
import torch
from triton_loader import DEVICE, load_triton_module

from kernels.kv_cache_ops import gather_blocks_ref, scatter_blocks_ref, write_kv_ref

ops = load_triton_module("kernels.kv_cache_ops_triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_write_kv_matches_reference_exactly(dtype, block_size):
    gen = torch.Generator().manual_seed(block_size)
    # k/v as views cut out of a fused qkv projection, as the model produces them.
    qkv = torch.randn(6, 4 * 24, generator=gen).to(dtype)
    k, v = qkv[:, 24:48].view(6, 3, 8), qkv[:, 48:72].view(6, 3, 8)
    slots = torch.tensor([2 * block_size + 3, -1, 0, 5 * block_size - 1, 4 * block_size, -1])
    cache = torch.randn(5, 2, 2, block_size, 3, 8, generator=gen).to(dtype)
    expected = cache.clone()
    write_kv_ref(k, v, expected, 1, slots)
    ours = cache.to(DEVICE)
    ops.write_kv_triton(k.to(DEVICE), v.to(DEVICE), ours, 1, slots.to(DEVICE))
    assert torch.equal(ours.cpu(), expected)


def test_gather_and_scatter_match_reference_exactly():
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(9, 2, 2, 16, 2, 8, generator=gen).to(torch.bfloat16)
    ids = torch.tensor([7, 1, 4])
    packed = ops.gather_blocks_triton(cache.to(DEVICE), ids.to(DEVICE))
    assert torch.equal(packed.cpu(), gather_blocks_ref(cache, ids))

    target = torch.zeros_like(cache)
    dest = torch.tensor([0, 8, 3])
    expected = target.clone()
    scatter_blocks_ref(expected, dest, packed.cpu())
    ours = target.to(DEVICE)
    ops.scatter_blocks_triton(ours, dest.to(DEVICE), packed)
    assert torch.equal(ours.cpu(), expected)


def test_gather_into_a_given_buffer_matches_reference_exactly():
    """The offload path gathers into rows of a reused staging buffer, viewed as pages."""
    gen = torch.Generator().manual_seed(1)
    cache = torch.randn(6, 2, 2, 16, 2, 8, generator=gen).to(torch.bfloat16)
    ids = torch.tensor([5, 0, 5, 2])
    staging = torch.zeros(8 * cache[0].numel() * 2, dtype=torch.uint8, device=DEVICE)
    out = staging.view(torch.bfloat16).view(8, *cache.shape[1:])[2:6]
    returned = ops.gather_blocks_triton(cache.to(DEVICE), ids.to(DEVICE), out=out)
    assert returned is out
    assert torch.equal(out.cpu(), gather_blocks_ref(cache, ids))
    assert torch.equal(gather_blocks_ref(cache, ids, out=torch.empty_like(out.cpu())), gather_blocks_ref(cache, ids))
    assert not staging.view(torch.bfloat16).view(8, -1)[[0, 1, 6, 7]].any()
