"""The sampler's tensor work: penalties on logits, and token choice by greedy or seeded Gumbel-max.

This module is the plain-PyTorch reference and the dispatchers; the Triton kernels live in
:mod:`kernels.sampler_triton`, imported on first CUDA use so the CPU path never needs triton.

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
        from kernels.sampler_triton import apply_penalties_triton

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
        from kernels.sampler_triton import sample_tokens_triton

        return sample_tokens_triton(logits, temperature, seeds, output_pos)
    return sample_tokens_reference(logits, temperature, seeds, output_pos)
