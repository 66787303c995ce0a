"""References of RMSNorm, rotary and SiLU-and-mul against HF transformers' Llama modules (exact)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from kernels import rms_norm, rotary_embedding, silu_and_mul

DTYPES = [torch.float32, torch.bfloat16]


def cos_sin_cache(head_dim: int, max_pos: int, theta: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_equals_hf(dtype):
    torch.manual_seed(0)
    hf = LlamaRMSNorm(64, eps=1e-6)
    hf.weight.data = torch.randn(64)
    hf = hf.to(dtype)
    x = torch.randn(5, 64).to(dtype)
    assert torch.equal(rms_norm(x, hf.weight, 1e-6), hf(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_residual_returns_sum_and_norm(dtype):
    torch.manual_seed(1)
    hf = LlamaRMSNorm(32, eps=1e-5).to(dtype)
    hf.weight.data = torch.rand(32).to(dtype)
    x, residual = torch.randn(4, 32).to(dtype), torch.randn(4, 32).to(dtype)
    out, new_residual = rms_norm(x, hf.weight, 1e-5, residual)
    assert torch.equal(new_residual, residual + x)
    assert torch.equal(out, hf(residual + x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_on_strided_qkv_view_equals_hf_qwen3(dtype):
    """Qwen3's q norm: [T, H, D] cut out of the fused qkv output, normalised in place, no copy first."""
    torch.manual_seed(5)
    hf = Qwen3RMSNorm(16, eps=1e-6)
    hf.weight.data = torch.randn(16)
    hf = hf.to(dtype)
    qkv = torch.randn(6, 8 * 16).to(dtype)
    q = qkv[:, : 4 * 16].view(6, 4, 16)
    out = rms_norm(q, hf.weight, 1e-6)
    assert out.is_contiguous() and torch.equal(out, hf(q))
    assert torch.equal(out.view(-1, 16), rms_norm(q.reshape(-1, 16), hf.weight, 1e-6))


def test_rms_norm_head_major_view_returns_contiguous():
    torch.manual_seed(6)
    q = torch.randn(4, 3, 8).transpose(0, 1)
    weight = torch.rand(8)
    out = rms_norm(q, weight, 1e-6)
    assert out.is_contiguous() and torch.equal(out, rms_norm(q.contiguous(), weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_equals_hf(dtype):
    torch.manual_seed(2)
    head_dim = 16
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=256,
                         rope_theta=10000.0)
    positions = torch.tensor([0, 1, 2, 77, 5, 200])
    q = torch.randn(6, 4, head_dim).to(dtype)
    k = torch.randn(6, 2, head_dim).to(dtype)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    ours_q, ours_k = rotary_embedding(positions, q, k, cos_sin_cache(head_dim, 256))
    assert torch.equal(ours_q, hf_q[0].transpose(0, 1))
    assert torch.equal(ours_k, hf_k[0].transpose(0, 1))


def test_rotary_partial_dim_leaves_tail_unrotated():
    torch.manual_seed(3)
    q, k = torch.randn(3, 2, 16), torch.randn(3, 1, 16)
    positions = torch.tensor([4, 0, 9])
    full_q, full_k = rotary_embedding(positions, q[..., :8], k[..., :8], cos_sin_cache(8, 16))
    part_q, part_k = rotary_embedding(positions, q, k, cos_sin_cache(8, 16))
    assert torch.equal(part_q[..., :8], full_q) and torch.equal(part_q[..., 8:], q[..., 8:])
    assert torch.equal(part_k[..., :8], full_k) and torch.equal(part_k[..., 8:], k[..., 8:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_equals_gated_mlp(dtype):
    torch.manual_seed(4)
    gate, up = torch.randn(5, 24).to(dtype), torch.randn(5, 24).to(dtype)
    out = silu_and_mul(torch.cat((gate, up), dim=-1))
    assert out.shape == (5, 24) and torch.equal(out, F.silu(gate) * up)
