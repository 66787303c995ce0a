"""The sampler's GPU work: penalties on logits, and token choice by greedy or seeded Gumbel-max.

Penalties (``apply_penalties``): repetition as HF/vLLM (a token seen in the prompt or output
has a positive logit divided by the penalty, a negative one multiplied), then presence and
frequency as OpenAI (``- frequency * count - presence * (count > 0)`` over the output).

Randomness is counter-based: the uniform noise of token ``t`` in a row is a pure function
``hash(seed, output_pos, t)`` computed with 32-bit integer arithmetic, so a seeded request
draws the same token alone or in any batch, and the torch reference and the Triton kernel
produce bit-identical noise bits (no ``torch.Generator`` state, no host synchronisation).

Sampling is Gumbel-max: ``argmax(logits * (1/T) - log(-log(u)))`` draws from ``softmax(logits / T)``;
tokens filtered out (top-k/top-p/min-p) carry ``-inf`` and are never chosen. Rows with
``T < 1e-5`` are greedy: ``argmax(logits)``, first index on ties (as ``torch.argmax`` and HF).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GREEDY_TEMPERATURE = 1e-5

_MASK32 = 0xFFFFFFFF
_FMIX_C1 = 0x85EBCA6B  # murmur3 fmix32 multipliers
_FMIX_C2 = 0xC2B2AE35
_SEED_SALT = 0x9E3779B9  # golden-ratio constant, separates the seed's high word from zero

# 23 noise bits: (k + 0.5) * 2^-23 is exact in fp32 and lies strictly inside (0, 1), so
# -log(-log(u)) is always finite.
_NOISE_SHIFT = 9
_NOISE_SCALE = 2.0**-23


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """``h * c mod 2^32`` for 0 <= h < 2^32, split into 16-bit halves so int64 never overflows."""
    lo = h * (c & 0xFFFF)
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, _FMIX_C2)
    return h ^ (h >> 16)


def row_keys(seeds: torch.Tensor, output_pos: torch.Tensor) -> torch.Tensor:
    """32-bit key of each row's draw (as int64 in [0, 2^32)): mixes the 64-bit seed and position."""
    lo = seeds & _MASK32
    hi = (seeds >> 32) & _MASK32
    key = _fmix32(hi ^ _SEED_SALT)
    key = _fmix32(key ^ lo)
    return _fmix32(key ^ (output_pos & _MASK32))


def noise_bits(seeds: torch.Tensor, output_pos: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] int64 in [0, 2^32): the counter-based hash of (seed, output_pos, token id)."""
    key = row_keys(seeds.long(), output_pos.long())[:, None]
    tokens = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)[None, :]
    h = _fmix32(tokens ^ key)
    return _fmix32((h + key) & _MASK32)


def uniform_noise(seeds: torch.Tensor, output_pos: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 uniform in (0, 1), a pure function of (seed, output_pos, token id)."""
    bits = noise_bits(seeds, output_pos, vocab_size) >> _NOISE_SHIFT
    return (bits.to(torch.float32) + 0.5) * _NOISE_SCALE


def apply_penalties_reference(
    logits: torch.Tensor,
    output_token_counts: torch.Tensor,
    prompt_token_mask: torch.Tensor | None,
    repetition_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
) -> torch.Tensor:
    """Torch reference: penalised copy of [B, V] float32 logits (see module docstring)."""
    seen_in_output = output_token_counts > 0
    if prompt_token_mask is not None:
        penalty = repetition_penalty[:, None]
        repeated = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen_in_output | prompt_token_mask, repeated, logits)
    return (
        logits
        - frequency_penalty[:, None] * output_token_counts.float()
        - presence_penalty[:, None] * seen_in_output.float()
    )


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
    """Triton kernel with the same signature and result as :func:`apply_penalties_reference`."""
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


def apply_penalties(
    logits: torch.Tensor,
    output_token_counts: torch.Tensor,
    prompt_token_mask: torch.Tensor | None,
    repetition_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
) -> torch.Tensor:
    """Penalised copy of the logits: Triton for CUDA tensors, the torch reference otherwise.

    Args:
        logits: [B, V] float32.
        output_token_counts: [B, V] int32 occurrences of each token in the output so far.
        prompt_token_mask: [B, V] bool, token occurs in the prompt; None skips the
            repetition penalty (all rows have penalty 1).
        repetition_penalty, presence_penalty, frequency_penalty: [B] float32.
    """
    args = (
        logits,
        output_token_counts,
        prompt_token_mask,
        repetition_penalty,
        presence_penalty,
        frequency_penalty,
    )
    if logits.is_cuda:
        return apply_penalties_triton(*args)
    return apply_penalties_reference(*args)


def sample_tokens_reference(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    output_pos: torch.Tensor,
) -> torch.Tensor:
    """Torch reference: [B] int64 token ids from [B, V] logits, taken in float32 (see module docstring)."""
    logits = logits.float()
    greedy = (temperature < GREEDY_TEMPERATURE)[:, None]
    inv_temp = 1.0 / torch.where(greedy, 1.0, temperature[:, None].float())
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, output_pos, logits.shape[1])))
    scores = torch.where(greedy, logits, logits * inv_temp + gumbel)
    return scores.argmax(dim=-1)


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
    """Triton kernel with the same signature and result as :func:`sample_tokens_reference`."""
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


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    output_pos: torch.Tensor,
) -> torch.Tensor:
    """Pick one token per row: Triton for CUDA tensors, the torch reference otherwise.

    Args:
        logits: [B, V] float32 (or bf16/fp16, widened exactly), penalised; filtered-out tokens hold ``-inf``.
        temperature: [B] float32; ``< 1e-5`` means greedy.
        seeds: [B] int64 per-request seeds.
        output_pos: [B] int64 index of the token being sampled in the request's output.
    Returns:
        [B] int64 token ids.
    """
    if logits.is_cuda:
        return sample_tokens_triton(logits, temperature, seeds, output_pos)
    return sample_tokens_reference(logits, temperature, seeds, output_pos)
