"""Paged attention over a block-major KV cache: the plain-PyTorch reference (the CPU engine's hot path).

One call serves prefill chunks over cached context and decodes. Sequences are padded into dense
batches (queries [B, Qmax, Hq, D], keys/values gathered through the block table [B, Lmax, Hk, D]) and
attended with a masked ``scaled_dot_product_attention`` in the activation dtype: as in Hugging Face's
SDPA path, softmax statistics stay in fp32 while the unnormalised probabilities are rounded to bf16/fp16
before the product with V (flash attention's rounding, which the Triton kernel shares). Decodes (one
query each) are batched apart from prefill chunks so that one long chunk does not pad every decode.
"""

import functools
import platform

import torch
import torch.nn.functional as F
from torch import Tensor


def _gather_context(
    kv_cache: Tensor, layer: int, block_tables: Tensor, seq_lens: Tensor, max_seq_len: int
) -> tuple[Tensor, Tensor, Tensor]:
    """K and V [B, Hk, Lmax, D] (cache dtype) of each sequence's positions, plus the valid-key mask [B, Lmax].

    Whole pages are gathered (one contiguous [bs, Hk, D] chunk each), not single slots: per-slot
    advanced indexing costs several times more on CPU, and so would a permuting copy.
    """
    num_seqs = block_tables.shape[0]
    _, _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_pages = -(-max_seq_len // block_size)
    pages_used = torch.div(seq_lens.long() + block_size - 1, block_size, rounding_mode="floor")
    # Table entries past a sequence's end may be padding (any value): point them at block 0.
    cols = torch.arange(num_pages, device=kv_cache.device)
    tables = torch.where(cols[None, :] < pages_used[:, None], block_tables[:, :num_pages].long(), 0)
    flat = tables.flatten()

    def gather(kv: int) -> Tensor:
        pages = kv_cache[:, layer, kv].index_select(0, flat)  # [B * P, bs, Hk, D], contiguous
        context = pages.view(num_seqs, num_pages * block_size, num_kv_heads, head_dim)[:, :max_seq_len]
        return context.transpose(1, 2)  # a view: SDPA takes the strides as they are

    valid = torch.arange(max_seq_len, device=kv_cache.device)[None, :] < seq_lens[:, None].long()
    return gather(0), gather(1), valid


def _attend_group(
    q: Tensor,
    kv_cache: Tensor,
    layer: int,
    block_tables: Tensor,
    seq_lens: Tensor,
    q_starts: Tensor,
    q_lens: Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Attention for a group of sequences; returns (outputs [N, Hq, D] in q.dtype, their query rows [N])."""
    num_tokens = q.shape[0]
    qi = torch.arange(max_query_len, device=q.device)
    q_valid = qi[None, :] < q_lens[:, None]
    rows = (q_starts[:, None] + qi[None, :]).clamp(max=num_tokens - 1)
    q_pad = q[rows].transpose(1, 2)  # [B, Hq, Qmax, D]

    k, v, key_valid = _gather_context(kv_cache, layer, block_tables, seq_lens, max_seq_len)
    # New token i of sequence b sits at position seq_len - q_len + i and sees positions <= its own.
    q_pos = (seq_lens.long() - q_lens)[:, None] + qi[None, :]
    kpos = torch.arange(max_seq_len, device=q.device)
    mask = (kpos[None, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :]
    out = F.scaled_dot_product_attention(
        q_pad, k, v, attn_mask=mask[:, None, :, :], scale=scale, enable_gqa=True
    )
    out = out.transpose(1, 2)  # [B, Qmax, Hq, D]
    return out[q_valid], rows[q_valid]


def paged_attention_ref(
    q: Tensor,
    kv_cache: Tensor,
    layer: int,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
) -> Tensor:
    """Causal attention of the new tokens ``q`` [T, Hq, D] over each sequence's paged K/V.

    Sequence b owns query rows ``query_start_loc[b]:query_start_loc[b+1]``; its ``seq_lens[b]``
    tokens (the new ones included, already written to the cache) sit at positions
    0..seq_lens[b]-1, reached through ``block_tables[b]``. GQA: Hq is a multiple of Hk.
    Softmax in fp32; returns [T, Hq, D] in ``q.dtype``.
    """
    out = torch.zeros_like(q)
    starts = query_start_loc[:-1].long()
    q_lens = query_start_loc[1:].long() - starts
    for idx in _groups(seq_lens, q_lens, q.device):
        lens = seq_lens[idx]
        group_max_seq = min(max_seq_len, int(lens.max()))
        group_max_query = min(max_query_len, int(q_lens[idx].max()))
        vals, rows = _attend_group(
            q, kv_cache, layer, block_tables[idx], lens, starts[idx], q_lens[idx], group_max_query,
            group_max_seq, scale,
        )
        out[rows] = vals
    return out


def _groups(seq_lens: Tensor, q_lens: Tensor, device: torch.device) -> list[Tensor]:
    """Sequence indices attended together: decodes apart from prefill chunks, and by key-row bucket.

    torch's CPU flash attention takes exp of whole vector widths with a fast approximation and of the
    row's last ``len % width`` keys with an exact exp, and sums those apart. Padding a row past its own
    bucket moves real keys from one path to the other, so bf16 probabilities round differently from
    an unpadded call (Hugging Face's); rows padded only within their bucket are bit-identical.
    """
    is_prefill = (q_lens > 1).long()
    key = (seq_lens.long() // _cpu_vector_width()) * 2 + is_prefill
    return [(key == k).nonzero().flatten() for k in torch.unique(key).tolist()]


@functools.cache
def _cpu_vector_width() -> int:
    """fp32 lanes of torch's CPU vector kernels (ATen's ``Vectorized<float>::size()``)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return 16
    if platform.machine().lower() in ("arm64", "aarch64") and not capability.startswith("SVE"):
        return 4
    return 8
