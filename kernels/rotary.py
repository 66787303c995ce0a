"""Rotary position embedding (NeoX / HF ``rotate_half`` style): the plain-PyTorch reference."""

import torch
from torch import Tensor


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF's ``x * cos + rotate_half(x) * sin`` over the first ``2 * cos.shape[-1]`` channels of x."""
    half = cos.shape[-1]
    rot = x[..., : 2 * half]
    x1, x2 = rot[..., :half], rot[..., half:]
    cos_full = torch.cat((cos, cos), dim=-1)
    sin_full = torch.cat((sin, sin), dim=-1)
    rotated = rot * cos_full + torch.cat((-x2, x1), dim=-1) * sin_full
    if rot.shape[-1] == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., 2 * half :]), dim=-1)


def rotary_embedding_ref(
    positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor
) -> tuple[Tensor, Tensor]:
    """Rotate ``q`` [T, Hq, D] and ``k`` [T, Hk, D] by the angles of ``positions`` [T].

    ``cos_sin_cache`` [max_pos, R] (fp32) holds cos in its first R/2 columns and sin in the rest;
    R is normally D (a smaller R rotates only the first R channels). Like HF, cos/sin are cast to
    the activation dtype before the multiply. Returns new tensors ``(q_out, k_out)``.
    """
    cs = cos_sin_cache.index_select(0, positions)
    half = cs.shape[-1] // 2
    cos = cs[:, None, :half]
    sin = cs[:, None, half:]
    q_out = _rotate(q, cos.to(q.dtype), sin.to(q.dtype))
    k_out = _rotate(k, cos.to(k.dtype), sin.to(k.dtype))
    return q_out, k_out
