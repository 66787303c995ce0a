"""Paged attention: the Triton kernel. One launch serves prefill chunks and decodes.

Grid: (query tile, kv head, key split). A program takes BLOCK_Q consecutive new tokens of one sequence and
all G query heads that share one KV head (GQA packing: BLOCK_M = BLOCK_Q * G rows), so each K/V
tile read from the cache feeds G heads. The flattened query-tile index maps to its sequence by
binary search over ``query_start_loc`` — the grid depends only on the token and sequence counts,
never on a value that would need a host read. Keys are walked in tiles of TILE_N positions whose
pages come from the block table (any block size), with an online softmax in fp32. A prefill step
with few query tiles and a long context splits the keys across programs (`_num_splits`) and
combines their partial results.
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

_LOG2E = 1.4426950408889634


@triton.jit
def _find_sequence(qsl_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """Largest b with ``query_start_loc[b] // BLOCK_Q + b <= tile`` (sequence b's first tile index)."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# The layer and the sequence count change from call to call: specialising on their values (== 1,
# divisible by 16) would compile new variants in the middle of serving, seconds each.
@triton.jit(do_not_specialize=["layer", "num_seqs", "num_splits", "stride_os", "stride_ms"])
def _paged_attention_kernel(
    q_ptr, cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr, part_ml_ptr,
    layer, num_seqs, num_splits, qk_scale, block_size, head_dim,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_os, stride_ms, stride_mt,
    stride_cb, stride_cl, stride_ckv, stride_co, stride_ch,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
    DIM: tl.constexpr, IEEE_DOT: tl.constexpr, SPLIT: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_sequence(qsl_ptr, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    q_tile = tile - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P2
    rows = tl.arange(0, BLOCK_M)
    token = q_tile * BLOCK_Q + rows // GROUP_P2  # index among this sequence's new tokens
    head = kv_head * GROUP + rows % GROUP_P2
    row_ok = (token < q_len) & (rows % GROUP_P2 < GROUP)
    q_pos = context + token
    dims = tl.arange(0, DIM)
    dim_ok = dims < head_dim

    q_rows = (q_start + token).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DIM], dtype=tl.float32)

    # Keys beyond the tile's last query position are masked for every row: stop there.
    last_token = tl.minimum(q_len, (q_tile + 1) * BLOCK_Q)
    num_keys = tl.minimum(seq_len, context + last_token)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    layer_base = cache_ptr + layer * stride_cl + kv_head * stride_ch
    first_key = 0
    if SPLIT:
        # This program's share of the keys: whole tiles, the same number for every split.
        per_split = tl.cdiv(tl.cdiv(num_keys, TILE_N), num_splits) * TILE_N
        first_key = split * per_split
        num_keys = tl.minimum(num_keys, first_key + per_split)
    for start in range(first_key, num_keys, TILE_N):
        pos = start + tl.arange(0, TILE_N)
        pos_ok = pos < num_keys
        page = tl.load(table + pos // block_size, mask=pos_ok, other=0).to(tl.int64)
        slot = page * stride_cb + (pos % block_size) * stride_co
        kv_mask = pos_ok[:, None] & dim_ok[None, :]
        k = tl.load(layer_base + slot[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(layer_base + stride_ckv + slot[:, None] + dims[None, :], mask=kv_mask, other=0.0)

        if IEEE_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        visible = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p_in = p.to(v.dtype)
        if IEEE_DOT:
            pv = tl.dot(p_in.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p_in, v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    o_rows = (q_start + token).to(tl.int64) * stride_ot + head * stride_oh
    if SPLIT:
        # Unnormalised partials of this split: acc into out [splits, T, H, D] fp32, (max, sum) into
        # part_ml [splits, T, H, 2]; the caller combines the splits.
        tl.store(out_ptr + split.to(tl.int64) * stride_os + o_rows[:, None] + dims[None, :], acc,
                 mask=row_ok[:, None] & dim_ok[None, :])
        ml = part_ml_ptr + split.to(tl.int64) * stride_ms + (q_start + token).to(tl.int64) * stride_mt + head * 2
        tl.store(ml, m_i, mask=row_ok)
        tl.store(ml + 1, l_i, mask=row_ok)
    else:
        out = acc / l_i[:, None]
        tl.store(out_ptr + o_rows[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & dim_ok[None, :])


def _ieee_dot(dtype: torch.dtype) -> bool:
    """fp32 inputs get exact fp32 products (not TF32), to match the fp32 reference and HF.

    Triton's CPU interpreter multiplies bf16 tiles as raw integers, so there bf16 operands are
    widened to fp32 first (exact; the GPU's bf16 MMA also accumulates in fp32).
    """
    interpreted = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on")
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreted)


def _tile_sizes(max_query_len: int, group_p2: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_Q, TILE_N): decodes use the smallest tile tl.dot allows (16 rows), prefill 64 rows.

    Decodes walk 64 keys per step: on the H100 that was the fastest point of a sweep
    of 16-128 keys, 1-8 warps and 2-4 stages (1024, 256 and 64 sequences), 8% faster than 32 keys at
    256 sequences. fp32 tiles are twice the bytes: prefill stays at 32x32 so Q, K and V stages fit in
    shared memory.
    """
    if max_query_len <= 1:
        rows, tile_n = 16, 64 if dtype != torch.float32 else 32
    elif dtype == torch.float32:
        rows, tile_n = 32, 32
    else:
        rows, tile_n = 64, 64
    return max(1, rows // group_p2), tile_n


def _num_splits(device: torch.device, programs: int, max_query_len: int, max_seq_len: int) -> int:
    """Key splits for a prefill step whose query tiles are too few to fill the GPU.

    The tail of a prompt whose prefix was loaded (256 new tokens over 16k cached ones, say) is a
    handful of query tiles, each walking every key alone: 64 programs on 132 SMs took 13 ms per
    step on an H200. Splitting the keys fills the GPU; the partial results are combined after.
    Decodes never split: their grid is baked into CUDA graphs.
    """
    if max_query_len <= 1 or device.type != "cuda":
        return 1
    sms = _sm_count(device)
    return max(1, min(_MAX_SPLITS, (2 * sms) // max(programs, 1), max_seq_len // _MIN_KEYS_PER_SPLIT))


_MAX_SPLITS = 16
_MIN_KEYS_PER_SPLIT = 512
_SMS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def paged_attention_triton(
    q: Tensor,
    kv_cache: Tensor,
    layer: int,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    num_splits: int | None = None,
) -> Tensor:
    """Same contract as ``kernels.paged_attention.paged_attention_ref``; ``num_splits`` overrides the
    choice of key splits (tests)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[4]
    group = num_heads // num_kv_heads
    group_p2 = triton.next_power_of_2(group)
    block_q, tile_n = _tile_sizes(max_query_len, group_p2, q.dtype)
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0:
        return out
    tiles = num_tokens // block_q + num_seqs
    if num_splits is None:
        num_splits = _num_splits(q.device, tiles * num_kv_heads, max_query_len, max_seq_len)
    split = num_splits > 1
    target = torch.empty((num_splits, *q.shape), dtype=torch.float32, device=q.device) if split else out
    part_ml = torch.empty((num_splits, num_tokens, num_heads, 2), dtype=torch.float32, device=q.device) if split else out
    _paged_attention_kernel[(tiles, num_kv_heads, num_splits)](
        q, kv_cache, target, block_tables, seq_lens, query_start_loc, part_ml,
        layer, num_seqs, num_splits, scale * _LOG2E, kv_cache.shape[3], head_dim,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        num_tokens * num_heads * head_dim, num_tokens * num_heads * 2, num_heads * 2,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
        GROUP=group, GROUP_P2=group_p2, BLOCK_Q=block_q, TILE_N=tile_n,
        DIM=max(16, triton.next_power_of_2(head_dim)), IEEE_DOT=_ieee_dot(q.dtype), SPLIT=split,
        num_warps=4, num_stages=2,
    )
    if split:
        out.copy_(_combine_splits(target, part_ml))
    return out


def _combine_splits(acc: Tensor, part_ml: Tensor) -> Tensor:
    """Softmax-weighted sum of the splits' partial outputs (log2 domain, as the kernel)."""
    m, l = part_ml[..., 0], part_ml[..., 1]
    m_max = m.amax(dim=0)
    weight = torch.exp2(m - m_max)   # an empty split (max -inf) weighs 0
    return (acc * weight[..., None]).sum(dim=0) / (l * weight).sum(dim=0)[..., None]
