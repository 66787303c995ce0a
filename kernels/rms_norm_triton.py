"""RMSNorm with fused residual add: the Triton kernel (one program per row)."""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    hidden, eps,
    stride_x, stride_residual, stride_out, stride_residual_out,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        # The sum is rounded to the activation dtype first, as HF's `residual + hidden_states` is.
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
    h = x.to(tl.float32)
    variance = tl.sum(h * h, axis=0) / hidden
    h = (h * tl.math.rsqrt(variance + eps)).to(x.dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * h.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: Tensor) -> Tensor:
    """``t`` as a [rows, H] view with unit column stride (copies only when it must)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm_triton(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """Same contract as ``kernels.rms_norm.rms_norm_ref``; x is [..., H]."""
    hidden = x.shape[-1]
    x2 = _rows(x)
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    out2 = out.view(-1, hidden)
    if residual is not None:
        res2 = _rows(residual)
        new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        new_res2 = new_residual.view(-1, hidden)
    else:
        res2 = new_res2 = x2
    block = triton.next_power_of_2(hidden)
    num_warps = min(max(block // 256, 1), 16)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, res2, weight, out2, new_res2,
        hidden, eps,
        x2.stride(0), res2.stride(0), out2.stride(0), new_res2.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
    )
    if residual is None:
        return out
    return out, new_residual
