"""Paged KV-cache moves: write new tokens' K/V into their slots, and gather/scatter whole blocks.

The cache is block-major, ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``, so one
block (all layers, K and V) is one contiguous span: offloading it is a single copy.
"""

import torch
from torch import Tensor


def write_kv_ref(k: Tensor, v: Tensor, kv_cache: Tensor, layer: int, slot_mapping: Tensor) -> None:
    """Store ``k``/``v`` [T, Hk, D] of layer ``layer`` at ``slot_mapping`` [T] (in place).

    A slot is ``block_id * block_size + offset``; a negative slot means "do not store this token"
    (e.g. padding of a CUDA-graph batch).
    """
    block_size = kv_cache.shape[3]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks = torch.div(slots, block_size, rounding_mode="floor")
    offsets = slots % block_size
    kv_cache[blocks, layer, 0, offsets] = k[keep].to(kv_cache.dtype)
    kv_cache[blocks, layer, 1, offsets] = v[keep].to(kv_cache.dtype)


def gather_blocks_ref(kv_cache: Tensor, block_ids: Tensor, out: Tensor | None = None) -> Tensor:
    """Pack blocks ``block_ids`` [n] into a contiguous tensor [n, L, 2, bs, Hk, D] (for offload): a new
    one, or ``out`` (contiguous, that shape and dtype)."""
    if out is None:
        return kv_cache.index_select(0, block_ids)
    return torch.index_select(kv_cache, 0, block_ids, out=out)


def scatter_blocks_ref(kv_cache: Tensor, block_ids: Tensor, src: Tensor) -> None:
    """Copy ``src`` [n, L, 2, bs, Hk, D] into blocks ``block_ids`` [n] of the cache (in place, for load)."""
    kv_cache.index_copy_(0, block_ids, src.to(kv_cache.dtype))
