"""The HF transformers baseline: the same architecture with random weights, built directly on the
device in the same dtype, decoding greedily with `generate`."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from engine.bench.common import release_memory, synchronize


@dataclass
class HFThroughput:
    batch_size: int
    batches: int
    output_tokens: int
    elapsed_s: float

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    def to_dict(self) -> dict:
        return asdict(self) | {"output_tok_s": self.output_tok_s}


@dataclass
class HFLatency:
    ttft_s: float  # generate with one new token: the prefill and the first token
    per_token_s: float  # each further token at batch 1

    @property
    def decode_tok_s(self) -> float:
        return 1.0 / self.per_token_s

    def to_dict(self) -> dict:
        return asdict(self) | {"decode_tok_s": self.decode_tok_s}


def build_model(raw_config: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights drawn on the device itself (an 8B model in seconds, no host copy)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    fields = {k: v for k, v in raw_config.items() if not k.startswith("_") and k != "model_type"}
    cfg = AutoConfig.for_model(raw_config["model_type"], **fields)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def _generate(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy, exactly `new_tokens` tokens (EOS cannot end it early)."""
    with torch.inference_mode():
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)


def _prompts(batch: int, input_len: int, vocab_size: int, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(vocab_size, (batch, input_len), generator=gen).to(device)


def _timed_generate(model, input_ids: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, int]:
    synchronize(device)
    start = time.perf_counter()
    out = _generate(model, input_ids, new_tokens)
    synchronize(device)
    elapsed = time.perf_counter() - start
    return elapsed, (out.shape[1] - input_ids.shape[1]) * out.shape[0]


def throughput(raw_config: dict, device: torch.device, dtype: torch.dtype, batch_size: int, batches: int,
               input_len: int, output_len: int, seed: int) -> HFThroughput:
    """Output tok/s of `batches` generate calls at `batch_size`, after a short warm-up call.

    Every prompt has `input_len` tokens, so the left padding HF would add is empty.
    """
    model = build_model(raw_config, device, dtype)
    vocab = raw_config["vocab_size"]
    _generate(model, _prompts(batch_size, input_len, vocab, device, seed), min(4, output_len))
    elapsed = 0.0
    tokens = 0
    for i in range(batches):
        seconds, n = _timed_generate(model, _prompts(batch_size, input_len, vocab, device, seed + 1 + i),
                                     output_len, device)
        elapsed += seconds
        tokens += n
    del model
    release_memory(device)
    return HFThroughput(batch_size, batches, tokens, elapsed)


def latency(raw_config: dict, device: torch.device, dtype: torch.dtype, input_len: int, output_len: int,
            seed: int) -> HFLatency:
    """Batch-1 time to first token, and time per further token from a full-length generate."""
    model = build_model(raw_config, device, dtype)
    prompt = _prompts(1, input_len, raw_config["vocab_size"], device, seed)
    _generate(model, prompt, min(4, output_len))
    first, _ = _timed_generate(model, prompt, 1, device)
    full, _ = _timed_generate(model, prompt, output_len, device)
    del model
    release_memory(device)
    return HFLatency(first, max(full - first, 0.0) / max(output_len - 1, 1))
