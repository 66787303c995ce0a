"""The sampler's Triton kernels: penalties on logits, and greedy or seeded Gumbel-max token choice.

Bit-identical to the torch references in :mod:`kernels.sampler`, whose docstring specifies the
penalties and the counter-based noise hash (the kernels spell out that hash's constants). Imported
by the dispatchers there on first CUDA use, and by the tests (interpreted on CPU), so the CPU path
never needs triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _penalty_kernel(
    logits_ptr,
    counts_ptr,
    prompt_mask_ptr,
    repetition_ptr,
    presence_ptr,
    frequency_ptr,
    out_ptr,
    vocab_size,
    HAS_PROMPT_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = offs < vocab_size
    row_offs = row.to(tl.int64) * vocab_size + offs
    x = tl.load(logits_ptr + row_offs, mask=in_vocab, other=0.0)
    counts = tl.load(counts_ptr + row_offs, mask=in_vocab, other=0)
    seen_in_output = counts > 0
    if HAS_PROMPT_MASK:
        penalty = tl.load(repetition_ptr + row)
        in_prompt = tl.load(prompt_mask_ptr + row_offs, mask=in_vocab, other=0) != 0
        repeated = tl.where(x > 0, tl.math.div_rn(x, penalty), x * penalty)
        x = tl.where(seen_in_output | in_prompt, repeated, x)
    x = x - tl.load(frequency_ptr + row) * counts.to(tl.float32)
    x = x - tl.load(presence_ptr + row) * seen_in_output.to(tl.float32)
    tl.store(out_ptr + row_offs, x, mask=in_vocab)


def apply_penalties_triton(
    logits: torch.Tensor,
    output_token_counts: torch.Tensor,
    prompt_token_mask: torch.Tensor | None,
    repetition_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
    block_v: int = 2048,
) -> torch.Tensor:
    """Triton kernel with the same signature and result as :func:`kernels.sampler.apply_penalties_reference`."""
    batch, vocab_size = logits.shape
    logits = logits.float().contiguous()
    out = torch.empty_like(logits)
    if batch == 0:
        return out
    has_prompt_mask = prompt_token_mask is not None
    prompt_mask = prompt_token_mask.contiguous().view(torch.uint8) if has_prompt_mask else logits
    _penalty_kernel[(batch, triton.cdiv(vocab_size, block_v))](
        logits,
        output_token_counts.int().contiguous(),
        prompt_mask,
        repetition_penalty.float().contiguous(),
        presence_penalty.float().contiguous(),
        frequency_penalty.float().contiguous(),
        out,
        vocab_size,
        HAS_PROMPT_MASK=has_prompt_mask,
        BLOCK_V=block_v,
        enable_fp_fusion=False,  # separate rounding of multiply and subtract, as in torch
    )
    return out


@triton.jit
def _fmix32_tl(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


# The per-row parameters may be rows of one packed [k, B] tensor: their alignment changes with the
# batch size's parity, and specialising on it would compile a new variant mid-serving (0.5 s).
@triton.jit(do_not_specialize_on_alignment=["temperature_ptr", "seeds_ptr", "output_pos_ptr"])
def _sample_kernel(
    logits_ptr,
    logits_stride,
    temperature_ptr,
    seeds_ptr,
    output_pos_ptr,
    chunk_max_ptr,
    chunk_idx_ptr,
    vocab_size,
    num_chunks,
    BLOCK_V: tl.constexpr,
):
    # Program (row, chunk) scores one vocabulary chunk and writes its best (value, index);
    # splitting rows over chunks keeps every SM busy even at batch 1.
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    temperature = tl.load(temperature_ptr + row)
    seed = tl.load(seeds_ptr + row)
    pos = tl.load(output_pos_ptr + row)
    greedy = temperature < 1e-5
    # One correctly rounded reciprocal per row; the per-token multiply is exact-rounded too.
    inv_temp = tl.math.div_rn(1.0, tl.where(greedy, 1.0, temperature))

    # uint32 arithmetic wraps mod 2^32, matching the reference's masked int64 math.
    lo = seed.to(tl.uint32)
    hi = (seed >> 32).to(tl.uint32)
    key = _fmix32_tl(hi ^ 0x9E3779B9)
    key = _fmix32_tl(key ^ lo)
    key = _fmix32_tl(key ^ pos.to(tl.uint32))

    offs = chunk * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = offs < vocab_size
    x = tl.load(logits_ptr + row.to(tl.int64) * logits_stride + offs, mask=in_vocab, other=0.0).to(tl.float32)
    h = _fmix32_tl(offs.to(tl.uint32) ^ key)
    h = _fmix32_tl(h + key)
    u = ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    gumbel = -tl.log(-tl.log(u))
    scores = tl.where(greedy, x, x * inv_temp + gumbel)
    scores = tl.where(in_vocab, scores, -float("inf"))
    best, best_idx = tl.max(scores, axis=0, return_indices=True)
    tl.store(chunk_max_ptr + row * num_chunks + chunk, best)
    tl.store(chunk_idx_ptr + row * num_chunks + chunk, chunk * BLOCK_V + best_idx.to(tl.int64))


def sample_tokens_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    output_pos: torch.Tensor,
    block_v: int = 2048,
) -> torch.Tensor:
    """Triton kernel with the same signature and result as :func:`kernels.sampler.sample_tokens_reference`."""
    batch, vocab_size = logits.shape
    if batch == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    # bf16/fp16 logits are read as they are and widened in the kernel (exactly): no fp32 copy of [B, V].
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_chunks = triton.cdiv(vocab_size, block_v)
    chunk_max = torch.empty(batch, num_chunks, dtype=torch.float32, device=logits.device)
    chunk_idx = torch.empty(batch, num_chunks, dtype=torch.int64, device=logits.device)
    _sample_kernel[(batch, num_chunks)](
        logits,
        logits.stride(0),
        temperature.float().contiguous(),
        seeds.long().contiguous(),
        output_pos.long().contiguous(),
        chunk_max,
        chunk_idx,
        vocab_size,
        num_chunks,
        BLOCK_V=block_v,
        enable_fp_fusion=False,
    )
    # argmax keeps the first chunk on ties, and each chunk kept its first index.
    best_chunk = chunk_max.argmax(dim=1, keepdim=True)
    return chunk_idx.gather(1, best_chunk).squeeze(1)
