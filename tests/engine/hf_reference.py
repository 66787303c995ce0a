"""Hugging Face transformers as the correctness reference for greedy decoding."""

from __future__ import annotations

import torch


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int] = frozenset()) -> list[int]:
    """Greedy tokens from an HF model with its own KV cache, stopping only on `stop_ids`."""
    past = None
    cur = torch.tensor([prompt_ids])
    out: list[int] = []
    for _ in range(max_new_tokens):
        res = model(input_ids=cur, past_key_values=past, use_cache=True)
        past = res.past_key_values
        token = int(res.logits[0, -1].argmax())
        out.append(token)
        if token in stop_ids:
            break
        cur = torch.tensor([[token]])
    return out
