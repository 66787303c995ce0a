"""Triton RMSNorm, rotary and SiLU-and-mul against their references (CPU interpreter here)."""

import pytest
import torch
from triton_loader import DEVICE, load_triton_module

from kernels.activation import silu_and_mul_ref
from kernels.rms_norm import rms_norm_ref
from kernels.rotary import rotary_embedding_ref

rms_norm_triton = load_triton_module("kernels.rms_norm_triton").rms_norm_triton
rotary_triton = load_triton_module("kernels.rotary_triton").rotary_embedding_triton
silu_and_mul_triton = load_triton_module("kernels.activation_triton").silu_and_mul_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 1e-3}


def cos_sin_cache(rotary_dim: int, max_pos: int) -> torch.Tensor:
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def close(actual, expected, dtype):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.cpu().float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96])
def test_rms_norm(dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(5, hidden, generator=gen).to(dtype)
    weight = torch.randn(hidden, generator=gen).to(dtype)
    close(rms_norm_triton(x.to(DEVICE), weight.to(DEVICE), 1e-6), rms_norm_ref(x, weight, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_fused_residual(dtype):
    gen = torch.Generator().manual_seed(1)
    x, residual = torch.randn(4, 48, generator=gen).to(dtype), torch.randn(4, 48, generator=gen).to(dtype)
    weight = torch.rand(48, generator=gen).to(dtype)
    out, new_residual = rms_norm_triton(x.to(DEVICE), weight.to(DEVICE), 1e-5, residual.to(DEVICE))
    ref_out, ref_residual = rms_norm_ref(x, weight, 1e-5, residual)
    # The interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest): 1 ulp apart.
    close(new_residual, ref_residual, dtype)
    close(out, ref_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,head_dim", [(3, 4, 16), (70, 4, 16), (5, 2, 96)])
def test_rms_norm_per_head_on_strided_view(dtype, tokens, heads, head_dim):
    """Qwen3's q/k norm: weight [D] over a [T, H, D] view cut out of a fused qkv tensor, read in place.

    (70, 4, 16) is 280 rows: two programs of 256, the second one partly masked.
    """
    gen = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, (heads + 2) * head_dim, generator=gen).to(dtype).to(DEVICE)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    weight = torch.rand(head_dim, generator=gen).to(dtype).to(DEVICE)
    out = rms_norm_triton(q, weight, 1e-6)
    assert out.is_contiguous()
    # Strides change where rows are read, never a bit of the result.
    flat = rms_norm_triton(q.reshape(-1, head_dim), weight, 1e-6)
    assert torch.equal(out.view(-1, head_dim), flat)
    close(out, rms_norm_ref(q.cpu(), weight.cpu(), 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_several_rows_per_program(dtype):
    """A width of 1000 packs 4 rows per program: 9 rows leave the last program one row, the rest masked."""
    gen = torch.Generator().manual_seed(3)
    x, residual = torch.randn(9, 1000, generator=gen).to(dtype), torch.randn(9, 1000, generator=gen).to(dtype)
    weight = torch.rand(1000, generator=gen).to(dtype)
    out, new_residual = rms_norm_triton(x.to(DEVICE), weight.to(DEVICE), 1e-6, residual.to(DEVICE))
    ref_out, ref_residual = rms_norm_ref(x, weight, 1e-6, residual)
    close(new_residual, ref_residual, dtype)
    close(out, ref_out, dtype)
    assert torch.equal(out[8:], rms_norm_triton(new_residual[8:], weight.to(DEVICE), 1e-6))


def test_rms_norm_no_rows():
    out = rms_norm_triton(torch.empty(0, 4, 16, device=DEVICE), torch.ones(16, device=DEVICE), 1e-6)
    assert out.shape == (0, 4, 16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary_dim", [32, 16])
def test_rotary(dtype, rotary_dim):
    gen = torch.Generator().manual_seed(rotary_dim)
    positions = torch.tensor([0, 3, 100, 7, 255])
    q = torch.randn(5, 6, 32, generator=gen).to(dtype)
    k = torch.randn(5, 2, 32, generator=gen).to(dtype)
    cache = cos_sin_cache(rotary_dim, 256)
    out_q, out_k = rotary_triton(positions.to(DEVICE), q.to(DEVICE), k.to(DEVICE), cache.to(DEVICE))
    ref_q, ref_k = rotary_embedding_ref(positions, q, k, cache)
    close(out_q, ref_q, dtype)
    close(out_k, ref_k, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [40, 1500])
def test_silu_and_mul(dtype, inter):
    x = torch.randn(3, 2 * inter, generator=torch.Generator().manual_seed(inter)).to(dtype)
    close(silu_and_mul_triton(x.to(DEVICE)), silu_and_mul_ref(x), dtype)
