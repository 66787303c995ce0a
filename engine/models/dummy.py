"""Random weights for a model config (vLLM's `--load-format dummy`): benchmarks of model shapes
whose weights cannot be downloaded here."""

from __future__ import annotations

import torch

from engine.models.config import ModelConfig
from engine.models.llama import CausalLM
from engine.models.registry import build_model


@torch.no_grad()
def load_dummy_model(cfg: ModelConfig, device: torch.device, seed: int = 0) -> CausalLM:
    """Build the model on `device` with small random weights (norm weights 1, biases 0).

    The values are drawn on the device itself, so an 8B-parameter model materialises in seconds.
    """
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to(dtype=cfg.dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=gen)
    model.build_rotary_cache()
    return model.eval()
