"""The rotary position embedding table: cos/sin per position, with optional llama3 frequency scaling."""

from __future__ import annotations

import math

import torch


def inverse_frequencies(head_dim: int, rope_theta: float, rope_scaling: dict | None) -> torch.Tensor:
    """Per-channel-pair rotation frequencies [head_dim // 2] in fp32, computed exactly as HF does.

    HF builds the exponent from an int64 arange cast to float; doing the same keeps fp32 logits equal.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
    inv_freq = 1.0 / (rope_theta ** exponents)
    if rope_scaling is None:
        return inv_freq
    return _llama3_scaled(inv_freq, rope_scaling)


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def cos_sin_cache(max_positions: int, head_dim: int, rope_theta: float, rope_scaling: dict | None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Table [max_positions, head_dim] fp32: cos of each angle in the first half, sin in the second.

    HF's full-width cos is cat(cos, cos) of these angles, so the half table loses nothing.
    """
    inv_freq = inverse_frequencies(head_dim, rope_theta, rope_scaling).to(device)
    positions = torch.arange(max_positions, dtype=torch.int64, device=device)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)
