"""Rotary position embedding (NeoX / HF rotate_half style): the Triton kernel, one program per token."""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, cos, sin, token, num_heads, half,
    stride_xt, stride_xh, stride_ot, stride_oh,
    HEADS: tl.constexpr, HALF: tl.constexpr,
):
    heads = tl.arange(0, HEADS)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    mask = (heads < num_heads) & (cols < half)
    x_row = x_ptr + token * stride_xt + heads * stride_xh + cols
    x1 = tl.load(x_row, mask=mask, other=0.0)
    x2 = tl.load(x_row + half, mask=mask, other=0.0)
    dt = x1.dtype
    c = cos.to(dt).to(tl.float32)
    s = sin.to(dt).to(tl.float32)
    # Each product and the sum are rounded to the activation dtype, as in HF's
    # `q * cos + rotate_half(q) * sin`.
    x1c = (x1.to(tl.float32) * c).to(dt).to(tl.float32)
    x2s = (x2.to(tl.float32) * s).to(dt).to(tl.float32)
    x2c = (x2.to(tl.float32) * c).to(dt).to(tl.float32)
    x1s = (x1.to(tl.float32) * s).to(dt).to(tl.float32)
    o_row = out_ptr + token * stride_ot + heads * stride_oh + cols
    tl.store(o_row, (x1c - x2s).to(dt), mask=mask)
    tl.store(o_row + half, (x2c + x1s).to(dt), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, q_out_ptr, k_out_ptr, cache_ptr,
    num_q_heads, num_kv_heads, half, stride_cache,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    cols = tl.arange(0, HALF)[None, :]
    cos = tl.load(cache_ptr + pos * stride_cache + cols, mask=cols < half, other=0.0)
    sin = tl.load(cache_ptr + pos * stride_cache + half + cols, mask=cols < half, other=0.0)
    _rotate_heads(q_ptr, q_out_ptr, cos, sin, token, num_q_heads, half,
                  stride_qt, stride_qh, stride_qot, stride_qoh, Q_HEADS, HALF)
    _rotate_heads(k_ptr, k_out_ptr, cos, sin, token, num_kv_heads, half,
                  stride_kt, stride_kh, stride_kot, stride_koh, K_HEADS, HALF)


def _output_like(x: Tensor, rotary_dim: int) -> Tensor:
    """Output buffer: channels past the rotary dim are copied through unchanged."""
    if rotary_dim == x.shape[-1]:
        return x.new_empty(x.shape)
    return x.clone(memory_format=torch.contiguous_format)


def rotary_embedding_triton(
    positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor
) -> tuple[Tensor, Tensor]:
    """Same contract as ``kernels.rotary.rotary_embedding_ref``."""
    rotary_dim = cos_sin_cache.shape[-1]
    half = rotary_dim // 2
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    q_out = _output_like(q, rotary_dim)
    k_out = _output_like(k, rotary_dim)
    if q.shape[0] == 0:
        return q_out, k_out
    _rotary_kernel[(q.shape[0],)](
        positions, q, k, q_out, k_out, cos_sin_cache,
        q.shape[1], k.shape[1], half, cos_sin_cache.stride(0),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        Q_HEADS=triton.next_power_of_2(q.shape[1]), K_HEADS=triton.next_power_of_2(k.shape[1]),
        HALF=triton.next_power_of_2(half), num_warps=4,
    )
    return q_out, k_out
