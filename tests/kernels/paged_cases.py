"""Builds paged-attention inputs for kernel tests: a block-major cache, block tables and query rows."""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PagedCase:
    """Arguments of ``paged_attention`` for one mixed batch (fields named as in the contract)."""

    q: Tensor
    kv_cache: Tensor
    layer: int
    block_tables: Tensor
    seq_lens: Tensor
    query_start_loc: Tensor
    max_query_len: int
    max_seq_len: int
    scale: float

    def args(self) -> tuple:
        return (
            self.q, self.kv_cache, self.layer, self.block_tables, self.seq_lens,
            self.query_start_loc, self.max_query_len, self.max_seq_len, self.scale,
        )


def make_paged_case(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    num_layers: int = 2,
    layer: int = 1,
    seed: int = 0,
) -> PagedCase:
    """``seqs`` lists (cached context length, new query length) per sequence.

    Blocks are handed out in a shuffled order, the unused tail of each block-table row holds random
    block ids (a kernel must never read them), and the whole cache is random (the new tokens' K/V
    count as already written).
    """
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [ctx + new for ctx, new in seqs]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(0, num_blocks, (len(seqs), max_blocks), generator=gen, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = perm[used : used + n].to(torch.int32)
        used += n
    shape = (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
    kv_cache = torch.randn(shape, generator=gen).to(dtype)
    q_lens = [new for _, new in seqs]
    q = torch.randn((sum(q_lens), num_heads, head_dim), generator=gen).to(dtype)
    qsl = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    return PagedCase(
        q=q, kv_cache=kv_cache, layer=layer, block_tables=tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), query_start_loc=qsl,
        max_query_len=max(q_lens), max_seq_len=max(seq_lens), scale=head_dim**-0.5,
    )


def naive_paged_attention(case: PagedCase) -> Tensor:
    """Token-by-token attention in fp64, reading each key through the block table."""
    block_size = case.kv_cache.shape[3]
    num_heads = case.q.shape[1]
    group = num_heads // case.kv_cache.shape[4]
    out = torch.zeros(case.q.shape, dtype=torch.float64)
    for b in range(case.seq_lens.shape[0]):
        start, end = int(case.query_start_loc[b]), int(case.query_start_loc[b + 1])
        seq_len = int(case.seq_lens[b])
        for i in range(end - start):
            pos = seq_len - (end - start) + i
            keys, values = [], []
            for j in range(pos + 1):
                block = int(case.block_tables[b, j // block_size])
                keys.append(case.kv_cache[block, case.layer, 0, j % block_size])
                values.append(case.kv_cache[block, case.layer, 1, j % block_size])
            k = torch.stack(keys).double()  # [n, Hk, D]
            v = torch.stack(values).double()
            for h in range(num_heads):
                scores = (k[:, h // group] @ case.q[start + i, h].double()) * case.scale
                out[start + i, h] = torch.softmax(scores, 0) @ v[:, h // group]
    return out
