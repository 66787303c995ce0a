"""Tiny random-weight HF model directories (config, sharded safetensors, byte-level tokenizer, chat template).

Reused by the model, engine and server tests: `make_tiny_model(tmp_path, "qwen3")` returns a directory
that both transformers and tierkv load.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# 256 byte tokens, then the special tokens: every string encodes, every id decodes.
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
EOS_TOKEN_ID = 256 + SPECIAL_TOKENS.index(EOS_TOKEN)

_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
_SHAPE = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-6,
    tie_word_embeddings=False, bos_token_id=None, eos_token_id=EOS_TOKEN_ID, pad_token_id=None,
)
_ARCH_DEFAULTS = {
    "mistral": dict(sliding_window=None),
    "qwen2": dict(use_sliding_window=False),
    "qwen3": dict(use_sliding_window=False),
}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (no merges) with ChatML special tokens and a chat template."""
    # Token i is byte i: easy to reason about in tests.
    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Spread weights well beyond HF's tiny init so greedy picks are not near-ties; biases nonzero too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.08 * noise)


def make_tiny_model(tmp_path: str | os.PathLike, arch: str, *, seed: int = 0, max_shard_size: str | None = "100KB",
                    dtype: torch.dtype = torch.float32, **overrides) -> str:
    """Write a tiny random-weight `arch` ("llama", "mistral", "qwen2", "qwen3") HF model; return its dir.

    2 layers, hidden 64, 4 heads of 16, 2 KV heads, vocab 259 (bytes + ChatML specials). `overrides`
    go to the transformers config (e.g. rope_scaling=..., tie_word_embeddings=True); the weights are
    saved in `dtype`, sharded at `max_shard_size` (None = one file).
    """
    if arch not in _CONFIGS:
        raise ValueError(f"arch {arch!r} is not one of {', '.join(_CONFIGS)}")
    fields = {**_SHAPE, **_ARCH_DEFAULTS.get(arch, {}), **overrides}
    config = _CONFIGS[arch](**fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    out = Path(tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    make_tokenizer().save_pretrained(out)
    return str(out)
