"""RMSNorm (optionally fused with the residual add): the plain-PyTorch reference.

The math follows Hugging Face Llama's ``LlamaRMSNorm`` operation for operation, so the CPU engine
reproduces HF's hidden states bit for bit in fp32.
"""

import torch
from torch import Tensor


def rms_norm_ref(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """Normalise the last dimension of ``x`` ([..., D]) by its root mean square and scale by ``weight``.

    ``x`` may be any strided view with unit last stride — e.g. Qwen3's per-head q/k norm passes
    [T, H, D] cut out of the fused qkv output; each [D] row is normalised on its own and the result
    is a new contiguous tensor (bit-identical to normalising a contiguous copy of ``x``).
    Without ``residual`` returns the normalised tensor. With ``residual`` first forms
    ``r = x + residual`` in ``x.dtype`` and returns ``(rms_norm(r), r)`` — ``r`` is the next layer's
    residual stream.
    """
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    # Elementwise results follow the input's stride order; a head-major view would come back head-major.
    out = (weight * h.to(x.dtype)).contiguous()
    if residual is None:
        return out
    return out, x
