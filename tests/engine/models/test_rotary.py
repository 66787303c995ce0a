"""Our RoPE table equals HF's cos/sin bit for bit (default and llama3-scaled), so fp32 logits can match."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from engine.models.rotary import cos_sin_cache

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["default", "llama3"])
def test_cos_sin_cache_equals_hf(scaling):
    head_dim, theta, max_pos = 128, 500000.0, 32768
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=max_pos,
                         rope_parameters={"rope_type": "default", **(scaling or {}), "rope_theta": theta})
    positions = torch.tensor([[0, 1, 7, 100, 4095, 8191, 20000, max_pos - 1]])
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
    ours = cos_sin_cache(max_pos, head_dim, theta, scaling)[positions[0]]
    half = head_dim // 2
    assert ours.shape == (8, head_dim) and ours.dtype == torch.float32
    assert torch.equal(torch.cat([ours[:, :half]] * 2, dim=-1), cos[0])
    assert torch.equal(torch.cat([ours[:, half:]] * 2, dim=-1), sin[0])
