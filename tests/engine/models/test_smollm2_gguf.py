"""The embedded SmolLM2 GGUF (dequantized at load): our logits equal HF's, and greedy decoding answers."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.models.attention import AttentionMetadata
from engine.models.config import load_model_config
from engine.models.loader import load_model, load_tokenizer

pytestmark = pytest.mark.slow
BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def smollm2():
    cfg = load_model_config(None)
    return cfg, load_model(cfg, torch.device("cpu")), load_tokenizer(cfg)


def _step(model, kv_cache, token_ids: list[int], start: int, table: list[int]) -> torch.Tensor:
    """Run tokens at positions [start, start + len) of one sequence; returns logits of every new token."""
    positions = torch.arange(start, start + len(token_ids))
    blocks = torch.tensor(table, dtype=torch.int32)
    attn = AttentionMetadata(
        slot_mapping=blocks[positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE,
        block_tables=blocks[None], seq_lens=torch.tensor([start + len(token_ids)], dtype=torch.int32),
        query_start_loc=torch.tensor([0, len(token_ids)], dtype=torch.int32),
        max_query_len=len(token_ids), max_seq_len=start + len(token_ids))
    return model.compute_logits(model(torch.tensor(token_ids), positions, kv_cache, attn))


def _prompt_ids(tokenizer) -> list[int]:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def test_embedded_config(smollm2):
    cfg, _, tokenizer = smollm2
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (
        "LlamaForCausalLM", 30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.dtype == torch.float32 and cfg.rope_theta == 100000.0
    assert cfg.eos_token_ids == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    assert "<|im_start|>assistant\n" in tokenizer.chat_template


@torch.inference_mode()
def test_logits_match_hf_and_greedy_answers_paris(smollm2):
    cfg, model, tokenizer = smollm2
    prompt = _prompt_ids(tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(cfg.path), gguf_file=os.path.basename(cfg.path),
                                              dtype=torch.float32).eval()
    for ours, theirs in [("num_layers", "num_hidden_layers"), ("num_kv_heads", "num_key_value_heads"),
                         ("rms_norm_eps", "rms_norm_eps"), ("vocab_size", "vocab_size"),
                         ("max_position_embeddings", "max_position_embeddings"), ("head_dim", "head_dim")]:
        assert getattr(cfg, ours) == getattr(hf.config, theirs)
    kv_cache = torch.zeros(8, cfg.num_layers, 2, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    table = [6, 1, 4, 3]
    logits = _step(model, kv_cache, prompt, 0, table)
    torch.testing.assert_close(logits, hf(torch.tensor([prompt])).logits[0], atol=2e-3, rtol=1e-3)

    generated = [int(logits[-1].argmax())]
    while len(generated) < 12 and generated[-1] not in cfg.eos_token_ids:
        step_logits = _step(model, kv_cache, generated[-1:], len(prompt) + len(generated) - 1, table)
        generated.append(int(step_logits[-1].argmax()))
    assert tokenizer.decode(generated, skip_special_tokens=True) == "The capital of France is Paris."
