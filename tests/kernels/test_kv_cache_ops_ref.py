"""References of the KV write and block gather/scatter against slot-by-slot loops."""

import pytest
import torch

from kernels import gather_blocks, scatter_blocks, write_kv


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_stores_each_token_at_its_slot(block_size, dtype):
    torch.manual_seed(0)
    kv_cache = torch.zeros(6, 3, 2, block_size, 2, 8, dtype=dtype)
    slots = torch.tensor([3 * block_size + 5, -1, 0, block_size - 1, 5 * block_size + block_size - 1, -1])
    k, v = torch.randn(6, 2, 8).to(dtype), torch.randn(6, 2, 8).to(dtype)
    write_kv(k, v, kv_cache, 2, slots)

    expected = torch.zeros_like(kv_cache)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected[slot // block_size, 2, 0, slot % block_size] = k[t]
            expected[slot // block_size, 2, 1, slot % block_size] = v[t]
    assert torch.equal(kv_cache, expected)


def test_gather_then_scatter_moves_whole_blocks():
    torch.manual_seed(1)
    kv_cache = torch.randn(7, 2, 2, 16, 2, 4).to(torch.bfloat16)
    ids = torch.tensor([4, 0, 6])
    packed = gather_blocks(kv_cache, ids)
    assert packed.shape == (3, 2, 2, 16, 2, 4) and packed.is_contiguous()
    for i, block in enumerate(ids.tolist()):
        assert torch.equal(packed[i], kv_cache[block])

    target = torch.zeros_like(kv_cache)
    dest = torch.tensor([1, 5, 2])
    scatter_blocks(target, dest, packed)
    for i, block in enumerate(dest.tolist()):
        assert torch.equal(target[block], kv_cache[ids[i]])
    untouched = [b for b in range(7) if b not in dest.tolist()]
    assert not target[untouched].any()
