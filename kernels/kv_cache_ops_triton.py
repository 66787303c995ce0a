"""Paged KV-cache moves: the Triton kernels (KV write into slots; whole-block gather and scatter)."""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit(do_not_specialize=["layer"])
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr, layer, block_size, num_heads, head_dim,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cl, stride_ckv, stride_co, stride_ch,
    HEADS: tl.constexpr, DIM: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // block_size
    offset = slot % block_size
    heads = tl.arange(0, HEADS)[:, None]
    dims = tl.arange(0, DIM)[None, :]
    mask = (heads < num_heads) & (dims < head_dim)
    dst = cache_ptr + block * stride_cb + layer * stride_cl + offset * stride_co + heads * stride_ch + dims
    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(k: Tensor, v: Tensor, kv_cache: Tensor, layer: int, slot_mapping: Tensor) -> None:
    """Same contract as ``kernels.kv_cache_ops.write_kv_ref``."""
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if k.shape[0] == 0:
        return
    _write_kv_kernel[(k.shape[0],)](
        k, v, kv_cache, slot_mapping, layer, kv_cache.shape[3], k.shape[1], k.shape[2],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
        HEADS=triton.next_power_of_2(k.shape[1]), DIM=triton.next_power_of_2(k.shape[2]), num_warps=4,
    )


@triton.jit
def _copy_blocks_kernel(
    src_ptr, dst_ptr, ids_ptr, block_numel, GATHER: tl.constexpr, CHUNK: tl.constexpr,
):
    """Copies one CHUNK of one block; the cache side is addressed through the block id."""
    i = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_numel
    block = tl.load(ids_ptr + i).to(tl.int64)
    if GATHER:
        src = src_ptr + block * block_numel + offs
        dst = dst_ptr + i * block_numel + offs
    else:
        src = src_ptr + i * block_numel + offs
        dst = dst_ptr + block * block_numel + offs
    tl.store(dst, tl.load(src, mask=mask), mask=mask)


_CHUNK = 4096


def _block_numel(kv_cache: Tensor) -> int:
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous (block-major) to move whole blocks")
    return kv_cache[0].numel()


def gather_blocks_triton(kv_cache: Tensor, block_ids: Tensor, out: Tensor | None = None) -> Tensor:
    """Same contract as ``kernels.kv_cache_ops.gather_blocks_ref``."""
    numel = _block_numel(kv_cache)
    if out is None:
        out = torch.empty((block_ids.shape[0], *kv_cache.shape[1:]), dtype=kv_cache.dtype, device=kv_cache.device)
    if block_ids.shape[0]:
        grid = (block_ids.shape[0], triton.cdiv(numel, _CHUNK))
        _copy_blocks_kernel[grid](kv_cache, out, block_ids, numel, GATHER=True, CHUNK=_CHUNK, num_warps=4)
    return out


def scatter_blocks_triton(kv_cache: Tensor, block_ids: Tensor, src: Tensor) -> None:
    """Same contract as ``kernels.kv_cache_ops.scatter_blocks_ref``."""
    numel = _block_numel(kv_cache)
    src = src.to(kv_cache.dtype).contiguous()
    if block_ids.shape[0]:
        grid = (block_ids.shape[0], triton.cdiv(numel, _CHUNK))
        _copy_blocks_kernel[grid](src, kv_cache, block_ids, numel, GATHER=False, CHUNK=_CHUNK, num_warps=4)
