"""Block checksums: the Triton chunk sums against the torch reference, and both against numpy's."""

import pytest
import torch
from triton_loader import DEVICE, load_triton_module

import kernels
from kernels.block_checksum import as_words, chunk_sums_host, chunk_sums_ref, combine
from kvstore.checksum import block_checksum, block_tag, data_checksum

ops = load_triton_module("kernels.block_checksum_triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_chunk_sums_match_reference_exactly(dtype):
    gen = torch.Generator().manual_seed(0)
    # 40 chunks per page: not a multiple of the kernel's 16-chunk tile, so its masked tail is exercised.
    cache = (torch.randn(6, 2, 2, 16, 5, 16 if dtype == torch.float32 else 32, generator=gen) * 1e3).to(dtype)
    ids = torch.tensor([4, 0, 4, 5])
    words = as_words(cache)
    expected = chunk_sums_ref(words, ids)
    ours = ops.chunk_sums_triton(words.to(DEVICE), ids.to(DEVICE))
    assert torch.equal(ours.cpu(), expected)
    assert torch.equal(ops.chunk_sums_triton(words.to(DEVICE), None).cpu(), chunk_sums_ref(words, None))


def test_pages_anywhere_give_the_checksum_of_the_contiguous_block():
    cache = torch.randint(-2**62, 2**62, (8, 3, 128), dtype=torch.int64)   # pages of 3 KiB
    ids = torch.tensor([6, 2, 5, 1])
    sums = combine(chunk_sums_ref(as_words(cache), ids), pages_per_block=2)
    expected = [data_checksum(cache[[6, 2]].numpy().tobytes()), data_checksum(cache[[5, 1]].numpy().tobytes())]
    assert sums.tolist() == expected


def test_any_changed_bit_or_moved_chunk_changes_the_checksum():
    block = torch.randint(-2**62, 2**62, (4, 128), dtype=torch.int64)
    base = data_checksum(block.numpy().tobytes())
    flipped = block.clone()
    flipped[2, 77] ^= 1 << 40
    swapped = block[[1, 0, 2, 3]].clone()
    assert data_checksum(flipped.numpy().tobytes()) != base
    assert data_checksum(swapped.numpy().tobytes()) != base


def test_the_tag_binds_namespace_key_length_and_expiry():
    payload = bytes(range(256)) * 8
    value = block_checksum(payload, "ns", b"k" * 16, 100.0)
    assert value == data_checksum(payload) ^ block_tag("ns", b"k" * 16, len(payload), 100.0)
    assert value != block_checksum(payload, "ns2", b"k" * 16, 100.0)
    assert value != block_checksum(payload, "ns", b"j" * 16, 100.0)
    assert value != block_checksum(payload, "ns", b"k" * 16, 101.0)
    assert value != block_checksum(payload + b"\0", "ns", b"k" * 16, 100.0)


def test_host_chunk_sums_match_reference_exactly():
    # Words near the int64 limits: every chunk sum wraps, as it must in both.
    words = torch.randint(-2**63, 2**63 - 1, (5, 3 * 128), dtype=torch.int64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(chunk_sums_host(words), chunk_sums_ref(words, None))
    assert kernels.block_checksums(words, None, 5).tolist() == [data_checksum(words.numpy().tobytes())]
