"""SiLU-and-multiply (the gated MLP activation): the plain-PyTorch reference."""

import torch.nn.functional as F
from torch import Tensor


def silu_and_mul_ref(x: Tensor) -> Tensor:
    """``silu(x[:, :I]) * x[:, I:]`` for ``x`` [T, 2*I] holding gate and up projections side by side."""
    inter = x.shape[-1] // 2
    # A contiguous gate takes torch's vectorised SiLU, bit-identical to HF's separate gate_proj path;
    # the strided slice would take the scalar path and differ in the last bit.
    return F.silu(x[..., :inter].contiguous()) * x[..., inter:]
