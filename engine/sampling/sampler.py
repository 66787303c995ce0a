"""The batched sampler: penalties, temperature, min-p, top-k, top-p, seeded draw, logprobs.

Everything is vectorised over the batch and free of host synchronisation: which optional
stages run is decided from Python flags set when the batch is built, never by reading
tensors back. The final token choice is :func:`kernels.sampler.sample_tokens` (Triton on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch

from engine.sampling.params import GREEDY_TEMPERATURE, SamplingParams
from kernels.sampler import apply_penalties as penalise
from kernels.sampler import sample_tokens

_MAX_TOPK_CANDIDATES = 4096


@dataclass
class SamplingBatch:
    """Per-row sampling state of one step, one row per sequence sampled.

    The trailing flags let the sampler skip work without reading tensors back (a host
    synchronisation): ``uses_min_p`` / ``uses_top_k_top_p`` say whether any row filters
    that way; ``max_top_k`` > 0 promises that every row filtering by rank or mass has
    ``0 < top_k <= max_top_k``, so only the ``max_top_k`` best tokens need sorting.
    The defaults are always correct; ``build`` sets them from the parameters.
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
    max_num_logprobs: int  # 0 = no top-N requested
    uses_min_p: bool = True
    uses_top_k_top_p: bool = True
    max_top_k: int = 0
    wants_logprobs: bool = True  # some row asked for logprobs (of its sampled token at least)

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
        # Requests of one batch usually share a few SamplingParams objects: convert each once.
        unique = {id(p): p for p in params}
        rows = {key: _param_row(p) for key, p in unique.items()}
        floats = _to_device([rows[id(p)][0] for p in params], torch.float32, device).t()
        ints = _to_device([[rows[id(p)][1] for p in params], [_to_int64(s) for s in seeds], output_pos],
                          torch.int64, device)
        penalised = any(p.uses_penalties for p in unique.values())
        repetition = any(p.repetition_penalty != 1.0 for p in unique.values())
        return SamplingBatch(
            temperature=floats[0].contiguous(),
            top_k=ints[0].to(torch.int32),
            top_p=floats[1].contiguous(),
            min_p=floats[2].contiguous(),
            seeds=ints[1],
            output_pos=ints[2],
            presence_penalty=floats[3].contiguous(),
            frequency_penalty=floats[4].contiguous(),
            repetition_penalty=floats[5].contiguous(),
            output_token_counts=(
                token_counts(output_ids, vocab_size, device) if penalised else None
            ),
            prompt_token_mask=(
                token_counts(prompt_ids, vocab_size, device) > 0 if repetition else None
            ),
            max_num_logprobs=max((p.logprobs or 0 for p in unique.values()), default=0),
            wants_logprobs=any(p.logprobs is not None for p in unique.values()),
            uses_min_p=any(row[0][2] > 0.0 for row in rows.values()),
            uses_top_k_top_p=any(row[1] > 0 or row[0][1] < 1.0 for row in rows.values()),
            max_top_k=_candidate_count([row[1] for row in rows.values()], [row[0][1] for row in rows.values()],
                                       vocab_size),
        )


@dataclass
class SamplerOutput:
    """Sampled tokens of one step and their logprobs (log-softmax of the raw logits)."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32, at the sampled token; None when no row wants logprobs
    topk_ids: torch.Tensor | None  # [B, K] int64, K = batch.max_num_logprobs
    topk_logprobs: torch.Tensor | None  # [B, K] float32


class Sampler:
    """Turns [B, V] logits into one token per row according to a :class:`SamplingBatch`.

    Stage order follows vLLM: repetition penalty, presence/frequency penalties,
    temperature, min-p, top-k, top-p, then the seeded Gumbel-max draw. Greedy rows
    (temperature < 1e-5) take the argmax of the penalised logits.
    """

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if batch.wants_logprobs or batch.output_token_counts is not None or batch.uses_min_p \
                or batch.uses_top_k_top_p:
            logits = logits.float()  # the stages below compute in fp32; the draw alone widens as it reads
        # A [B, vocab] log-softmax is a full pass over the logits: only when some row reads it.
        raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.wants_logprobs else None
        penalised = apply_penalties(logits, batch)
        keep = filter_mask(penalised, batch)
        filtered = penalised if keep is None else penalised.masked_fill(~keep, float("-inf"))
        token_ids = sample_tokens(filtered, batch.temperature, batch.seeds, batch.output_pos)
        topk_ids = topk_logprobs = None
        if raw_logprobs is None:
            return SamplerOutput(token_ids, None, None, None)
        sampled_logprobs = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
        if batch.max_num_logprobs > 0:
            topk_logprobs, topk_ids = raw_logprobs.topk(batch.max_num_logprobs, dim=-1)
        return SamplerOutput(token_ids, sampled_logprobs, topk_ids, topk_logprobs)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition, presence and frequency penalties (see :mod:`kernels.sampler`).

    Returns ``logits`` itself when the batch has no penalties.
    """
    if batch.output_token_counts is None:
        return logits
    return penalise(
        logits,
        batch.output_token_counts,
        batch.prompt_token_mask,
        batch.repetition_penalty,
        batch.presence_penalty,
        batch.frequency_penalty,
    )


def filter_mask(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor | None:
    """[B, V] bool: tokens that survive min-p, top-k and top-p at each row's temperature.

    None when no row filters. The row's best token always survives. Top-k keeps every
    token tied with the k-th; top-p keeps the smallest prefix of the tokens, best first,
    whose mass reaches p.
    """
    if not (batch.uses_min_p or batch.uses_top_k_top_p):
        return None
    greedy = batch.temperature < GREEDY_TEMPERATURE
    temperature = torch.where(greedy, 1.0, batch.temperature)[:, None]
    scaled = logits / temperature
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if batch.uses_min_p:
        # p_i >= min_p * p_max  <=>  exp(s_i - s_max) >= min_p.
        max_scaled = scaled.max(dim=-1, keepdim=True).values
        keep = torch.exp(scaled - max_scaled) >= batch.min_p[:, None]
        scaled = scaled.masked_fill(~keep, float("-inf"))
    if batch.uses_top_k_top_p:
        keep &= _top_k_top_p_mask(scaled, batch)
    return keep | greedy[:, None]


def _top_k_top_p_mask(scaled: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    vocab_size = scaled.shape[1]
    if batch.max_top_k > 0:
        # Every filtering row keeps at most max_top_k tokens: rank only those candidates.
        candidates, order = scaled.topk(batch.max_top_k, dim=-1)
    else:
        candidates, order = scaled.sort(dim=-1, descending=True)
    k = torch.where(batch.top_k > 0, batch.top_k, vocab_size).clamp(max=candidates.shape[1])
    kth_value = candidates.gather(1, (k.long() - 1)[:, None])
    keep_sorted = candidates >= kth_value
    probs = torch.softmax(candidates.masked_fill(~keep_sorted, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # top_p == 1 keeps everything even where rounding pushes the running sum to 1.
    top_p = batch.top_p[:, None]
    keep_sorted &= (mass_before < top_p) | (top_p >= 1.0)
    keep = torch.zeros_like(scaled, dtype=torch.bool).scatter(1, order, keep_sorted)
    unfiltered = ((batch.top_k <= 0) & (batch.top_p >= 1.0))[:, None]
    return keep | unfiltered


def _candidate_count(top_k: list[int], top_p: list[float], vocab_size: int) -> int:
    """max_top_k for ``SamplingBatch``: 0 unless top-k bounds every rank/mass-filtering row."""
    filtering = [(k, p) for k, p in zip(top_k, top_p) if k > 0 or p < 1.0]
    if not filtering or any(k <= 0 for k, _ in filtering):
        return 0
    largest = max(k for k, _ in filtering)
    # Beyond a few thousand candidates a partial top-k is no cheaper than a full sort.
    return largest if largest <= min(_MAX_TOPK_CANDIDATES, vocab_size) else 0


def token_counts(
    token_ids: list[list[int]], vocab_size: int, device: torch.device | str
) -> torch.Tensor:
    """[B, V] int32 occurrences of each token id in each row's list."""
    counts = torch.zeros(len(token_ids), vocab_size, dtype=torch.int32, device=device)
    # One flat host-to-device copy instead of a padded [B, max_len] matrix.
    flat = torch.tensor(list(chain.from_iterable(token_ids)), dtype=torch.int64)
    if flat.numel() == 0:
        return counts
    lengths = torch.tensor([len(ids) for ids in token_ids])
    rows = torch.repeat_interleave(torch.arange(len(token_ids)), lengths)
    index = (rows * vocab_size + flat).to(device)
    ones = torch.ones(flat.numel(), dtype=torch.int32, device=device)
    return counts.view(-1).index_add_(0, index, ones).view(len(token_ids), vocab_size)


def _param_row(p: SamplingParams) -> tuple[list[float], int]:
    """(temperature, top_p, min_p, presence, frequency, repetition), top_k of one request.

    Greedy rows take the argmax of the penalised logits, so their filters are neutral.
    """
    g = p.greedy
    top_k = 0 if g or p.top_k < 0 else p.top_k
    floats = [p.temperature, 1.0 if g else p.top_p, 0.0 if g else p.min_p,
              p.presence_penalty, p.frequency_penalty, p.repetition_penalty]
    return floats, top_k


def _to_device(rows: list[list], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """One host-to-device copy of a small table; pinned and non-blocking on CUDA, so a step in
    flight is never waited for (a pageable copy would synchronise the stream)."""
    table = torch.tensor(rows, dtype=dtype)
    if torch.device(device).type == "cuda":
        table = table.pin_memory()
    return table.to(device, non_blocking=True)


def _to_int64(seed: int) -> int:
    """Reduce any Python int to the signed 64-bit value with the same low 64 bits."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed
