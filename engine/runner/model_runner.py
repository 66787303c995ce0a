"""Runs one step: device-side inputs → forward over the paged KV cache → logits → sampled tokens.

One code path for every device: the `kernels` dispatchers pick Triton on CUDA and the torch
references elsewhere. On CUDA, pure-decode steps replay CUDA graphs (unless `enforce_eager`), and
`execute` only enqueues work: it returns a `StepHandle` whose results are read later, so the host
can plan the next step while this one runs (async scheduling).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.core.block_pool import KVBlock
from engine.core.sched_output import SchedulerOutput
from engine.models.attention import AttentionMetadata
from engine.models.config import ModelConfig
from engine.models.dummy import load_dummy_model
from engine.models.loader import load_model
from engine.runner.batch_state import BatchState
from engine.runner.cuda_graphs import DecodeGraphs, capture_sizes
from engine.runner.prefill_graphs import PrefillGraphs, graph_output_bytes
from engine.sampling.sampler import Sampler, SamplingBatch

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass
class StepResult:
    """Tokens sampled this step, one per sampling request, in schedule order."""

    token_ids: list[int]
    logprobs: list[float] | None = None
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


class StepHandle:
    """A step enqueued on the device; `result()` waits for it and reads its tokens back."""

    def __init__(self, tensors: dict[str, torch.Tensor], event: torch.cuda.Event | None) -> None:
        self._tensors = tensors
        self._event = event

    def result(self) -> StepResult:
        if self._event is not None:
            self._event.synchronize()
        t = self._tensors
        if "token_ids" not in t:
            return StepResult(token_ids=[])
        result = StepResult(token_ids=t["token_ids"].tolist())
        if "logprobs" in t:
            result.logprobs = t["logprobs"].tolist()
        if "topk_ids" in t:
            result.topk_ids = t["topk_ids"].tolist()
            result.topk_logprobs = t["topk_logprobs"].tolist()
        return result


def kv_bytes_per_block(cfg: ModelConfig, block_size: int) -> int:
    elem = torch.empty((), dtype=cfg.dtype).element_size()
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elem


class ModelRunner:
    """Owns the model weights, the block-major KV cache and the device-resident batch state."""

    def __init__(self, model_config: ModelConfig, config: EngineConfig, device: torch.device,
                 max_model_len: int) -> None:
        self.model_config = model_config
        self.config = config
        self.device = device
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.model = (load_dummy_model(model_config, device, config.seed) if config.load_format == "dummy"
                      else load_model(model_config, device))
        self.sampler = Sampler()
        self.state = BatchState(config.max_num_seqs, max_model_len, self.block_size, device)
        self.num_blocks = self._num_blocks()
        self.kv_cache = torch.zeros(
            self.num_blocks, model_config.num_layers, 2, self.block_size,
            model_config.num_kv_heads, model_config.head_dim, dtype=model_config.dtype, device=device)
        logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB)", self.num_blocks,
                    self.block_size, self.num_blocks * self.block_size,
                    self.kv_cache.numel() * self.kv_cache.element_size() / 2**30)
        self.graphs = None
        self.prefill_graphs = None
        if device.type == "cuda" and not config.enforce_eager:
            self.graphs = DecodeGraphs(self._forward, config.max_num_seqs,
                                       self.state.block_tables.shape[1], device)
            self.graphs.capture()
            self.prefill_graphs = PrefillGraphs(self._forward, self.state.block_tables.shape[1], self.block_size,
                                                device)
            self.prefill_graphs.capture(self.graphs.pool)

    @torch.inference_mode()
    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, self.kv_cache, attn)

    def _num_blocks(self) -> int:
        if self.config.num_gpu_blocks is not None:
            return self.config.num_gpu_blocks
        per_block = kv_bytes_per_block(self.model_config, self.block_size)
        budget = (self._profile_kv_budget() if self.device.type == "cuda"
                  else self.config.kv_cache_memory_bytes or DEFAULT_CPU_KV_BYTES)
        max_blocks = -(-self.max_model_len // self.block_size)
        # More blocks than every sequence slot at full length can use is wasted memory.
        num = min(budget // per_block, self.config.max_num_seqs * max_blocks)
        if num < max_blocks:
            raise ValueError(f"the KV cache fits {num} blocks of {self.block_size} tokens, fewer than one "
                             f"sequence of max_model_len={self.max_model_len} needs; lower max_model_len or "
                             "raise gpu_memory_utilization")
        return int(num)

    @torch.inference_mode()
    def _profile_kv_budget(self) -> int:
        """Bytes left for the KV cache: run a forward at the largest step, keep its peak, give the rest."""
        cfg = self.model_config
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = self.config.max_num_batched_tokens
        scratch = torch.zeros(1, cfg.num_layers, 2, self.block_size, cfg.num_kv_heads, cfg.head_dim,
                              dtype=cfg.dtype, device=self.device)
        # One sequence of every token of the step: the widest activations and attention a step can have.
        attn = AttentionMetadata(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=self.device),
            block_tables=torch.zeros(1, -(-num_tokens // self.block_size), dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            max_query_len=num_tokens, max_seq_len=num_tokens)
        positions = torch.arange(num_tokens, device=self.device) % self.max_model_len
        hidden = self.model(torch.zeros(num_tokens, dtype=torch.int64, device=self.device), positions, scratch, attn)
        rows = min(num_tokens, self.config.max_num_seqs)
        logits = self.model.compute_logits(hidden[:rows]).float()
        torch.log_softmax(logits, dim=-1)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device)
        del scratch, hidden, logits
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        outside_torch = total - free - torch.cuda.memory_reserved(self.device)
        graph_margin = 0 if self.config.enforce_eager else self._graph_memory(peak, num_tokens)
        budget = int(total * self.config.gpu_memory_utilization) - outside_torch - peak - graph_margin
        logger.info("memory profile: %.2f GiB peak for a %d-token step (weights included), %.2f GiB used "
                    "outside torch, %.2f GiB left for the KV cache at gpu_memory_utilization=%.2f",
                    peak / 2**30, num_tokens, outside_torch / 2**30, budget / 2**30,
                    self.config.gpu_memory_utilization)
        return max(budget, 0)

    def _graph_memory(self, peak: int, num_tokens: int) -> int:
        """Bytes the decode graphs' private pool will hold beyond the profiled peak.

        The pool keeps the activations of the largest graph (activations grow linearly with the
        tokens of a step, so they are scaled down from the profiled step) and every graph's output
        hidden states, plus a fixed allowance for the allocator's rounding.
        """
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        sizes = capture_sizes(self.config.max_num_seqs)
        activations = max(peak - weights, 0) * sizes[-1] // num_tokens
        elem = torch.empty((), dtype=self.model_config.dtype).element_size()
        outputs = (sum(sizes) * self.model_config.hidden_size * elem
                   + graph_output_bytes(self.model_config.hidden_size, elem))
        return activations + outputs + (256 << 20)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, blocks_of: Callable[[str], list[KVBlock]],
                batch: SamplingBatch | None, banned: list[tuple[int, list[int]]] | None = None) -> StepHandle:
        """Enqueue one step: upload its changes, forward, sample, write sampled tokens back on the device.

        `banned` lists (sampling row, token ids) that row may not produce yet (EOS and stop tokens
        before `min_tokens`).
        """
        size = prefill_size = None
        decode = out.num_batched_tokens == len(out.scheduled) and all(sr.sample for sr in out.scheduled)
        if self.graphs is not None and decode:
            size = self.graphs.padded_size(len(out.scheduled))
        elif self.prefill_graphs is not None and len(out.scheduled) == 1:
            sr = out.scheduled[0]
            prefill_size = self.prefill_graphs.padded_size(sr.num_tokens, sr.start + sr.num_tokens)
        step = self.state.prepare(out, blocks_of, size or prefill_size)
        if size is not None:
            hidden = self.graphs.replay(step, size)
        else:
            if prefill_size is not None:
                hidden = self.prefill_graphs.replay(step, prefill_size)
            else:
                hidden = self.model(step.input_ids, step.positions, self.kv_cache, step.attn)
            if batch is None:
                return StepHandle({}, None)
            hidden = hidden[step.logits_indices]
        logits = self.model.compute_logits(hidden)
        if banned:
            logits = self._ban(logits, banned)
        sampled = self.sampler(logits, batch)
        self.state.write_sampled(step, sampled.token_ids)
        tensors = {"token_ids": sampled.token_ids}
        if sampled.logprobs is not None:
            tensors["logprobs"] = sampled.logprobs
            if sampled.topk_ids is not None:
                tensors["topk_ids"] = sampled.topk_ids
                tensors["topk_logprobs"] = sampled.topk_logprobs
        return self._read_back(tensors)

    def _ban(self, logits: torch.Tensor, banned: list[tuple[int, list[int]]]) -> torch.Tensor:
        rows = [row for row, ids in banned for _ in ids]
        ids = [i for _, token_ids in banned for i in token_ids]
        index = torch.tensor([rows, ids], dtype=torch.int64)
        if self.device.type == "cuda":
            index = index.pin_memory()
        index = index.to(self.device, non_blocking=True)
        logits = logits.clone()
        logits[index[0], index[1]] = float("-inf")
        return logits

    def _read_back(self, tensors: dict[str, torch.Tensor]) -> StepHandle:
        """Start copying the step's results to pinned host memory; the handle waits for them."""
        if self.device.type != "cuda":
            return StepHandle(tensors, None)
        host = {}
        for name, t in tensors.items():
            host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host[name].copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return StepHandle(host, event)
