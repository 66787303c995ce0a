"""The batched sampler: penalties, temperature, min-p, top-k, top-p, seeded draw, logprobs.

Everything is vectorised over the batch and free of host synchronisation: which optional
stages run is decided from Python flags set when the batch is built, never by reading
tensors back. The final token choice is :func:`kernels.sampler.sample_tokens` (Triton on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling.params import GREEDY_TEMPERATURE, SamplingParams
from kernels.sampler import sample_tokens


@dataclass
class SamplingBatch:
    """Per-row sampling state of one step, one row per sequence sampled.

    ``uses_top_k_top_p`` lets the sampler skip the vocabulary sort when no row filters by
    rank or mass; it defaults to True (always correct) and ``build`` clears it when possible.
    """

    temperature: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int32, 0 = off
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] int64
    output_pos: torch.Tensor  # [B] int64
    presence_penalty: torch.Tensor  # [B] float32
    frequency_penalty: torch.Tensor  # [B] float32
    repetition_penalty: torch.Tensor  # [B] float32
    output_token_counts: torch.Tensor | None  # [B, V] int32; None = no penalties in the batch
    prompt_token_mask: torch.Tensor | None  # [B, V] bool; None = no repetition penalty
    max_num_logprobs: int  # 0 = none requested
    uses_top_k_top_p: bool = True

    @staticmethod
    def build(
        params: list[SamplingParams],
        seeds: list[int],
        output_pos: list[int],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingBatch:
        """Gather the rows' parameters into tensors on ``device``.

        ``seeds`` are the requests' seeds (any Python int, reduced to 64 bits);
        ``output_pos[i]`` is the index of the token being sampled within row i's output.
        """
        greedy = [p.greedy for p in params]
        # Greedy rows take the argmax of the penalised logits, so their filters are neutral.
        top_k = [0 if g or p.top_k < 0 else p.top_k for p, g in zip(params, greedy)]
        top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        min_p = [0.0 if g else p.min_p for p, g in zip(params, greedy)]

        def f32(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        penalised = any(p.uses_penalties for p in params)
        repetition = any(p.repetition_penalty != 1.0 for p in params)
        return SamplingBatch(
            temperature=f32([p.temperature for p in params]),
            top_k=torch.tensor(top_k, dtype=torch.int32, device=device),
            top_p=f32(top_p),
            min_p=f32(min_p),
            seeds=torch.tensor([_to_int64(s) for s in seeds], dtype=torch.int64, device=device),
            output_pos=torch.tensor(output_pos, dtype=torch.int64, device=device),
            presence_penalty=f32([p.presence_penalty for p in params]),
            frequency_penalty=f32([p.frequency_penalty for p in params]),
            repetition_penalty=f32([p.repetition_penalty for p in params]),
            output_token_counts=(
                token_counts(output_ids, vocab_size, device) if penalised else None
            ),
            prompt_token_mask=(
                token_counts(prompt_ids, vocab_size, device) > 0 if repetition else None
            ),
            max_num_logprobs=max((p.logprobs or 0 for p in params), default=0),
            uses_top_k_top_p=any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p),
        )


@dataclass
class SamplerOutput:
    """Sampled tokens of one step and their logprobs (log-softmax of the raw logits)."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32, at the sampled token
    topk_ids: torch.Tensor | None  # [B, K] int64, K = batch.max_num_logprobs
    topk_logprobs: torch.Tensor | None  # [B, K] float32


class Sampler:
    """Turns [B, V] logits into one token per row according to a :class:`SamplingBatch`.

    Stage order follows vLLM: repetition penalty, presence/frequency penalties,
    temperature, min-p, top-k, top-p, then the seeded Gumbel-max draw. Greedy rows
    (temperature < 1e-5) take the argmax of the penalised logits.
    """

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        penalised = apply_penalties(logits, batch)
        keep = filter_mask(penalised, batch)
        filtered = penalised.masked_fill(~keep, float("-inf"))
        token_ids = sample_tokens(filtered, batch.temperature, batch.seeds, batch.output_pos)
        sampled_logprobs = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
        topk_ids = topk_logprobs = None
        if batch.max_num_logprobs > 0:
            topk_logprobs, topk_ids = raw_logprobs.topk(batch.max_num_logprobs, dim=-1)
        return SamplerOutput(token_ids, sampled_logprobs, topk_ids, topk_logprobs)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition penalty (HF/vLLM), then presence and frequency penalties (OpenAI).

    Repetition: a token seen in the prompt or output has a positive logit divided by the
    penalty and a negative one multiplied by it. Frequency/presence: the logit drops by
    ``frequency * count + presence * (count > 0)`` over the output so far.
    """
    counts = batch.output_token_counts
    if counts is None:
        return logits
    seen_in_output = counts > 0
    if batch.prompt_token_mask is not None:
        penalty = batch.repetition_penalty[:, None]
        seen = seen_in_output | batch.prompt_token_mask
        repeated = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, repeated, logits)
    return (
        logits
        - batch.frequency_penalty[:, None] * counts.float()
        - batch.presence_penalty[:, None] * seen_in_output.float()
    )


def filter_mask(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[B, V] bool: tokens that survive min-p, top-k and top-p at each row's temperature.

    The row's best token always survives. Top-k keeps every token tied with the k-th;
    top-p keeps the smallest prefix of the sorted tokens whose mass reaches p.
    """
    greedy = batch.temperature < GREEDY_TEMPERATURE
    temperature = torch.where(greedy, 1.0, batch.temperature)[:, None]
    scaled = logits / temperature
    # min-p: p_i >= min_p * p_max  <=>  exp(s_i - s_max) >= min_p.
    max_scaled = scaled.max(dim=-1, keepdim=True).values
    keep = torch.exp(scaled - max_scaled) >= batch.min_p[:, None]
    if batch.uses_top_k_top_p:
        keep &= _top_k_top_p_mask(scaled.masked_fill(~keep, float("-inf")), batch)
    return keep | greedy[:, None]


def _top_k_top_p_mask(scaled: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    vocab_size = scaled.shape[1]
    sorted_scaled, order = scaled.sort(dim=-1, descending=True)
    k = torch.where(batch.top_k > 0, batch.top_k, vocab_size).clamp(max=vocab_size).long()
    kth_value = sorted_scaled.gather(1, (k - 1)[:, None])
    keep_sorted = sorted_scaled >= kth_value
    probs = torch.softmax(sorted_scaled.masked_fill(~keep_sorted, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # top_p == 1 keeps everything even where rounding pushes the running sum to 1.
    top_p = batch.top_p[:, None]
    keep_sorted &= (mass_before < top_p) | (top_p >= 1.0)
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def token_counts(
    token_ids: list[list[int]], vocab_size: int, device: torch.device | str
) -> torch.Tensor:
    """[B, V] int32 occurrences of each token id in each row's list."""
    counts = torch.zeros(len(token_ids), vocab_size, dtype=torch.int32, device=device)
    width = max((len(ids) for ids in token_ids), default=0)
    if width == 0:
        return counts
    padded = torch.tensor(
        [ids + [0] * (width - len(ids)) for ids in token_ids], dtype=torch.int64, device=device
    )
    present = torch.tensor(
        [[1] * len(ids) + [0] * (width - len(ids)) for ids in token_ids],
        dtype=torch.int32,
        device=device,
    )
    return counts.scatter_add_(1, padded, present)


def _to_int64(seed: int) -> int:
    """Reduce any Python int to the signed 64-bit value with the same low 64 bits."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed
