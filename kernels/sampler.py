"""Token choice from (already penalised and filtered) logits: greedy or seeded Gumbel-max.

Randomness is counter-based: the uniform noise of token ``t`` in a row is a pure function
``hash(seed, output_pos, t)`` computed with 32-bit integer arithmetic, so a seeded request
draws the same token alone or in any batch, and the torch reference and the Triton kernel
produce bit-identical noise bits (no ``torch.Generator`` state, no host synchronisation).

Sampling is Gumbel-max: ``argmax(logits / T - log(-log(u)))`` draws from ``softmax(logits / T)``;
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


def sample_tokens_reference(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    output_pos: torch.Tensor,
) -> torch.Tensor:
    """Torch reference: [B] int64 token ids from [B, V] float32 logits (see module docstring)."""
    greedy = (temperature < GREEDY_TEMPERATURE)[:, None]
    temp = torch.where(greedy, 1.0, temperature[:, None].float())
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, output_pos, logits.shape[1])))
    scores = torch.where(greedy, logits, logits / temp + gumbel)
    return scores.argmax(dim=-1)


@triton.jit
def _fmix32_tl(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _sample_kernel(
    logits_ptr,
    logits_stride,
    temperature_ptr,
    seeds_ptr,
    output_pos_ptr,
    out_ptr,
    vocab_size,
    BLOCK_V: tl.constexpr,
):
    # One program per row; the running (max, index) over vocabulary chunks keeps the
    # first index on ties because a later chunk must be strictly greater to win.
    row = tl.program_id(0)
    temperature = tl.load(temperature_ptr + row)
    seed = tl.load(seeds_ptr + row)
    pos = tl.load(output_pos_ptr + row)
    greedy = temperature < 1e-5
    temp = tl.where(greedy, 1.0, temperature)

    # uint32 arithmetic wraps mod 2^32, matching the reference's masked int64 math.
    lo = seed.to(tl.uint32)
    hi = (seed >> 32).to(tl.uint32)
    key = _fmix32_tl(hi ^ 0x9E3779B9)
    key = _fmix32_tl(key ^ lo)
    key = _fmix32_tl(key ^ pos.to(tl.uint32))

    best_val = -float("inf")
    best_idx = 0
    row_ptr = logits_ptr + row.to(tl.int64) * logits_stride
    for start in range(0, vocab_size, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_vocab = offs < vocab_size
        x = tl.load(row_ptr + offs, mask=in_vocab, other=-float("inf"))
        h = _fmix32_tl(offs.to(tl.uint32) ^ key)
        h = _fmix32_tl(h + key)
        u = ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
        gumbel = -tl.log(-tl.log(u))
        scores = tl.where(greedy, x, tl.math.div_rn(x, temp) + gumbel)
        scores = tl.where(in_vocab, scores, -float("inf"))
        chunk_val, chunk_idx = tl.max(scores, axis=0, return_indices=True)
        take = chunk_val > best_val
        best_val = tl.where(take, chunk_val, best_val)
        best_idx = tl.where(take, start + chunk_idx, best_idx)
    tl.store(out_ptr + row, best_idx.to(tl.int64))


def sample_tokens_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    output_pos: torch.Tensor,
    block_v: int = 1024,
) -> torch.Tensor:
    """Triton kernel with the same signature and result as :func:`sample_tokens_reference`."""
    batch, vocab_size = logits.shape
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    logits = logits.float()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    _sample_kernel[(batch,)](
        logits,
        logits.stride(0),
        temperature.float().contiguous(),
        seeds.long().contiguous(),
        output_pos.long().contiguous(),
        out,
        vocab_size,
        BLOCK_V=block_v,
    )
    return out


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    output_pos: torch.Tensor,
) -> torch.Tensor:
    """Pick one token per row: Triton for CUDA tensors, the torch reference otherwise.

    Args:
        logits: [B, V] float32, penalised; filtered-out tokens hold ``-inf``.
        temperature: [B] float32; ``< 1e-5`` means greedy.
        seeds: [B] int64 per-request seeds.
        output_pos: [B] int64 index of the token being sampled in the request's output.
    Returns:
        [B] int64 token ids.
    """
    if logits.is_cuda:
        return sample_tokens_triton(logits, temperature, seeds, output_pos)
    return sample_tokens_reference(logits, temperature, seeds, output_pos)
