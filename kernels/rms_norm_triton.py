"""RMSNorm with fused residual add: the Triton kernel (a tile of several rows per program).

A row is one [D] vector: a token's hidden state, or one head of one token for Qwen3's q/k norm. The
q/k case reads a [T, H, D] view of the fused qkv output through its token and head strides, so the
slice is never copied to make it contiguous.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

# Elements of one program's tile. With one row per program an 8k-token Qwen3 prefill ran its norms at
# about half the H100's copy bandwidth: a 128-wide head row is only 256 bytes per program. 4096 elements
# with 8 warps give each thread 16 elements — two 16-byte loads per bf16 tensor in flight at once.
TILE_ELEMENTS = 4096
ELEMENTS_PER_THREAD = 16


def launch_config(hidden: int) -> tuple[int, int, int]:
    """``(BLOCK, ROWS, num_warps)`` for rows of ``hidden`` elements.

    Depends on ``hidden`` only, not on the row count, so a model compiles one variant per norm width
    and never recompiles mid-serving when the batch size changes.
    """
    block = triton.next_power_of_2(hidden)
    rows = max(1, TILE_ELEMENTS // block)
    num_warps = min(max(rows * block // (32 * ELEMENTS_PER_THREAD), 1), 16)
    return block, rows, num_warps


# The row count changes every step: specialising on it (== 1, divisible by 16) would compile
# new variants while serving.
@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    num_rows, heads, hidden, eps,
    stride_xt, stride_xh, stride_residual, stride_out, stride_residual_out,
    HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < hidden
    mask = (rows < num_rows)[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    x_row = (rows // heads).to(tl.int64) * stride_xt + (rows % heads).to(tl.int64) * stride_xh
    x = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + rows64[:, None] * stride_residual + cols[None, :], mask=mask, other=0.0)
        # The sum is rounded to the activation dtype first, as HF's `residual + hidden_states` is.
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + rows64[:, None] * stride_residual_out + cols[None, :], x, mask=mask)
    h = x.to(tl.float32)
    variance = tl.sum(h * h, axis=1) / hidden
    h = (h * tl.math.rsqrt(variance + eps)[:, None]).to(x.dtype)
    w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0)
    out = w.to(tl.float32)[None, :] * h.to(tl.float32)
    tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: Tensor) -> Tensor:
    """``t`` as a [rows, D] view with unit column stride (copies only when it must)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _token_head_view(x: Tensor) -> tuple[Tensor, int, int, int]:
    """``(x', heads, stride_token, stride_head)``: row ``t * heads + h`` of x' starts at ``t*st + h*sh``.

    A 3-D [T, H, D] input with unit column stride is read in place whatever its token and head strides;
    anything else is flattened to rows (a view when possible).
    """
    if x.dim() == 3 and x.stride(-1) == 1:
        return x, x.shape[1], x.stride(0), x.stride(1)
    x2 = _rows(x)
    return x2, 1, x2.stride(0), 0


def rms_norm_triton(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """Same contract as ``kernels.rms_norm.rms_norm_ref``; x is [..., D], results are contiguous."""
    hidden = x.shape[-1]
    x_src, heads, stride_xt, stride_xh = _token_head_view(x)
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    out2 = out.view(-1, hidden)
    num_rows = out2.shape[0]
    if residual is not None:
        res2 = _rows(residual)
        new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        new_res2 = new_residual.view(-1, hidden)
    else:
        res2 = new_res2 = out2
    if num_rows:
        block, rows, num_warps = launch_config(hidden)
        _rms_norm_kernel[(triton.cdiv(num_rows, rows),)](
            x_src, res2, weight, out2, new_res2,
            num_rows, heads, hidden, eps,
            stride_xt, stride_xh, res2.stride(0), out2.stride(0), new_res2.stride(0),
            HAS_RESIDUAL=residual is not None, ROWS=rows, BLOCK=block, num_warps=num_warps,
        )
    if residual is None:
        return out
    return out, new_residual
