"""The roofline: the fastest a step could run on this device, from the bytes it must read and the
FLOPs it must do, over memory bandwidth and matmul throughput measured in the same run.

A step reads every weight once (the lm_head fully; the input embedding only for the rows it looks
up, which is counted as nothing), reads the KV of every scheduled sequence's context and writes the
KV of its new tokens. Its FLOPs are 2 per weight per token for the decoder layers and 2 per lm_head
weight per scheduled sequence (at most one logits row each); attention FLOPs are left out, so for
long prefills the roofline is a little optimistic about compute. Step time = max(bytes / bandwidth,
FLOPs / peak).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from engine.models.config import ModelConfig


@dataclass
class Hardware:
    """Ceilings measured on the device: memory bandwidth (bytes read + written per second) and
    matmul throughput in the model dtype."""

    device: str
    bandwidth_bytes_per_s: float
    peak_flops: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelCost:
    """What one step of the model costs, independent of the batch."""

    weight_bytes: int  # bytes a step reads: decoder layers, final norm, lm_head (not the input embedding)
    layer_params: int  # parameters of the decoder layers and final norm (2 FLOPs each per token)
    lm_head_params: int  # parameters of the logits projection (2 FLOPs each per logits row)
    kv_bytes_per_token: int  # K and V of one token over all layers

    def to_dict(self) -> dict:
        return asdict(self)


def measure_hardware(device: torch.device, dtype: torch.dtype, copy_bytes: int = 1 << 30,
                     matmul_size: int | None = None, repeats: int = 5) -> Hardware:
    """Best-of-`repeats` device copy bandwidth and square-matmul FLOP/s on `device`."""
    matmul_size = matmul_size or (8192 if device.type == "cuda" else 1024)
    hw = Hardware(str(device), copy_bandwidth(device, copy_bytes, repeats),
                  matmul_flops(device, dtype, matmul_size, repeats))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the engine's KV pool is sized from the memory left free
    return hw


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Bytes per second moved by one large copy (each byte read once and written once)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    best = min(_timed(device, lambda: dst.copy_(src)) for _ in range(repeats + 1))
    del src, dst
    return 2 * nbytes / best


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """FLOP/s of an n×n×n matmul in `dtype` (CPU matmuls run in float32: reduced precision is slow there)."""
    if device.type != "cuda":
        dtype = torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    best = min(_timed(device, lambda: torch.matmul(a, b, out=out)) for _ in range(repeats + 1))
    del a, b, out
    return 2 * n**3 / best


def _timed(device: torch.device, fn) -> float:
    """Seconds one call of `fn` takes on the device (CUDA events there, wall clock on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def model_cost(model: torch.nn.Module, cfg: ModelConfig) -> ModelCost:
    """Count the bytes and parameters of the model actually loaded.

    A tied model's logits read the embedding matrix in full, so it counts once, as the lm_head.
    """
    params = dict(model.named_parameters())  # a tied matrix appears once, under its first name
    embed = next((n for n in params if n.endswith("embed_tokens.weight")), None)
    head = next((n for n in params if n.endswith("lm_head.weight")), None) or embed
    layer_bytes = sum(p.numel() * p.element_size() for n, p in params.items() if n not in (embed, head))
    layer_params = sum(p.numel() for n, p in params.items() if n not in (embed, head))
    head_params = params[head].numel() if head else 0
    head_bytes = head_params * params[head].element_size() if head else 0
    elem = torch.empty((), dtype=cfg.dtype).element_size()
    kv = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * elem
    return ModelCost(layer_bytes + head_bytes, layer_params, head_params, kv)


def step_seconds(cost: ModelCost, hw: Hardware, num_tokens: int, num_seqs: int, context_tokens: int) -> float:
    """Roofline time of one step (see the module docstring)."""
    nbytes = cost.weight_bytes + (context_tokens + num_tokens) * cost.kv_bytes_per_token
    flops = 2 * cost.layer_params * num_tokens + 2 * cost.lm_head_params * num_seqs
    return max(nbytes / hw.bandwidth_bytes_per_s, flops / hw.peak_flops)


def records_seconds(cost: ModelCost, hw: Hardware, records) -> float:
    """Σ roofline time over the engine's step records."""
    return sum(step_seconds(cost, hw, r.num_tokens, r.num_seqs, r.context_tokens) for r in records)
