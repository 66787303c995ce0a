"""Runs one step: inputs → forward over the paged KV cache → logits → sampled tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.core.scheduler import SchedulerOutput
from engine.models.config import ModelConfig
from engine.models.dummy import load_dummy_model
from engine.models.loader import load_model
from engine.runner.inputs import prepare_inputs
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


def kv_bytes_per_block(cfg: ModelConfig, block_size: int) -> int:
    elem = torch.empty((), dtype=cfg.dtype).element_size()
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elem


class ModelRunner:
    """Owns the model weights and the block-major KV cache on one device."""

    def __init__(self, model_config: ModelConfig, config: EngineConfig, device: torch.device,
                 max_model_len: int) -> None:
        self.model_config = model_config
        self.config = config
        self.device = device
        self.block_size = config.block_size
        self.model = (load_dummy_model(model_config, device, config.seed) if config.load_format == "dummy"
                      else load_model(model_config, device))
        self.sampler = Sampler()
        self.num_blocks = self._num_blocks(max_model_len)
        self.kv_cache = torch.zeros(
            self.num_blocks, model_config.num_layers, 2, self.block_size,
            model_config.num_kv_heads, model_config.head_dim, dtype=model_config.dtype, device=device)
        logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB)", self.num_blocks,
                    self.block_size, self.num_blocks * self.block_size,
                    self.kv_cache.numel() * self.kv_cache.element_size() / 2**20)

    def _num_blocks(self, max_model_len: int) -> int:
        if self.config.num_gpu_blocks is not None:
            return self.config.num_gpu_blocks
        per_block = kv_bytes_per_block(self.model_config, self.block_size)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * self.config.gpu_memory_utilization) - (total - free) - (1 << 30)
        else:
            budget = self.config.kv_cache_memory_bytes or DEFAULT_CPU_KV_BYTES
        # More blocks than every sequence slot at full length can use is wasted memory.
        useful = self.config.max_num_seqs * -(-max_model_len // self.block_size)
        num = min(budget // per_block, useful)
        if num < -(-max_model_len // self.block_size):
            raise ValueError(f"the KV cache fits {num} blocks of {self.block_size} tokens, fewer than one "
                             f"sequence of max_model_len={max_model_len} needs; lower max_model_len or "
                             "give the cache more memory")
        return int(num)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, block_tables: list[list[int]], batch: SamplingBatch | None,
                banned: list[tuple[int, list[int]]] | None = None) -> StepResult:
        """One forward over the scheduled tokens; samples for requests whose chunk ends their tokens.

        `banned` lists (sampling row, token ids) that row may not produce yet (EOS and stop
        tokens before `min_tokens`).
        """
        inputs = prepare_inputs(out, block_tables, self.block_size, self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.attn)
        if batch is None:
            return StepResult(token_ids=[])
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        for row, token_ids in banned or ():
            logits[row, token_ids] = float("-inf")
        sampled = self.sampler(logits, batch)
        result = StepResult(token_ids=sampled.token_ids.tolist())
        if batch.max_num_logprobs > 0 or any(sr.request.sampling_params.logprobs is not None
                                              for sr in out.scheduled if sr.sample):
            result.logprobs = sampled.logprobs.tolist()
            if sampled.topk_ids is not None:
                result.topk_ids = sampled.topk_ids.tolist()
                result.topk_logprobs = sampled.topk_logprobs.tolist()
        return result
