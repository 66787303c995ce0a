"""The paged-attention reference against token-by-token attention and against HF's eager attention."""

import pytest
import torch
from paged_cases import make_paged_case, naive_paged_attention
from transformers.models.llama.modeling_llama import eager_attention_forward

from kernels import paged_attention
from kernels.kv_cache_ops import write_kv_ref
from kernels.paged_attention import paged_attention_ref

# (cached context, new tokens): prefill from scratch, chunks over cached context, decodes.
MIXED = [(0, 7), (5, 1), (37, 9), (20, 1), (0, 1), (64, 1), (16, 16)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 1)])
def test_mixed_batch_matches_naive(block_size, dtype, heads):
    case = make_paged_case(MIXED, heads[0], heads[1], 16, block_size, dtype, seed=block_size)
    out = paged_attention_ref(*case.args())
    assert out.dtype == dtype and out.shape == case.q.shape
    expected = naive_paged_attention(case)
    torch.testing.assert_close(out.double(), expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("seqs", [[(3, 1), (40, 1), (17, 1)], [(0, 12)], [(33, 5), (0, 3)]])
def test_decode_only_and_prefill_only_batches(seqs):
    case = make_paged_case(seqs, 4, 2, 8, 16, torch.float32, seed=3)
    out = paged_attention(*case.args())
    torch.testing.assert_close(out.double(), naive_paged_attention(case), atol=1e-5, rtol=1e-5)


def test_matches_hf_eager_attention_fp32():
    """A 3-chunk prefill through the paged cache equals HF's eager attention over the whole prompt."""
    torch.manual_seed(0)
    num_heads, num_kv_heads, head_dim, block_size, length = 6, 2, 16, 16, 45
    q = torch.randn(length, num_heads, head_dim)
    k = torch.randn(length, num_kv_heads, head_dim)
    v = torch.randn(length, num_kv_heads, head_dim)
    kv_cache = torch.zeros(8, 1, 2, block_size, num_kv_heads, head_dim)
    blocks = torch.tensor([[5, 2, 7, 0]], dtype=torch.int32)
    slots = (blocks[0].long()[:, None] * block_size + torch.arange(block_size)).flatten()[:length]

    outs = []
    for start, end in [(0, 20), (20, 21), (21, 45)]:
        write_kv_ref(k[start:end], v[start:end], kv_cache, 0, slots[start:end])
        qsl = torch.tensor([0, end - start], dtype=torch.int32)
        seq_lens = torch.tensor([end], dtype=torch.int32)
        outs.append(paged_attention_ref(q[start:end], kv_cache, 0, blocks, seq_lens, qsl, end - start, end,
                                        head_dim**-0.5))
    ours = torch.cat(outs)

    class Module(torch.nn.Module):
        num_key_value_groups = num_heads // num_kv_heads

    causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
    hf, _ = eager_attention_forward(Module().eval(), q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                    v.transpose(0, 1)[None], causal, head_dim**-0.5)
    torch.testing.assert_close(ours, hf[0], atol=2e-6, rtol=1e-5)
