"""Our CausalLM over a paged KV cache gives HF's logits (fp32) for prefill and for a cached decode step."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.models.attention import AttentionMetadata
from engine.models.config import load_model_config
from engine.models.loader import load_model
from tests.engine.tiny_models import make_tiny_model

BLOCK_SIZE = 16
NUM_BLOCKS = 8
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
CASES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope": ("llama", {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0}}),
    "mistral": ("mistral", {}),
    "qwen2-bias": ("qwen2", {}),
    "qwen3-qk-norm": ("qwen3", {}),
    "llama-attention-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
}


def _metadata(block_tables: list[list[int]], starts: list[int], lengths: list[int]):
    """Positions and attention metadata for sequences whose new tokens are [start, start+length)."""
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)])
    width = max(len(t) for t in block_tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
    row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    slots = table[row, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
    seq_lens = torch.tensor([s + n for s, n in zip(starts, lengths)], dtype=torch.int32)
    qsl = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    attn = AttentionMetadata(slot_mapping=slots, block_tables=table, seq_lens=seq_lens, query_start_loc=qsl,
                             max_query_len=max(lengths), max_seq_len=int(seq_lens.max()))
    return positions, attn


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    arch, overrides = CASES[request.param]
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), arch, **overrides)
    ours = load_model(load_model_config(path, "float32"), torch.device("cpu"))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, hf


def _kv_cache(model) -> torch.Tensor:
    cfg = model.cfg
    return torch.zeros(NUM_BLOCKS, cfg.num_layers, 2, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)


@torch.inference_mode()
def test_prefill_then_decode_matches_hf(pair):
    ours, hf = pair
    prompt = torch.randint(0, ours.cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(3))
    kv_cache = _kv_cache(ours)
    table = [[5, 2]]  # non-contiguous, descending: the cache is addressed through the table only
    positions, attn = _metadata(table, [0], [20])
    logits = ours.compute_logits(ours(prompt, positions, kv_cache, attn))
    expected = hf(prompt[None]).logits[0]
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)

    next_token = logits[-1].argmax().reshape(1)
    positions, attn = _metadata(table, [20], [1])
    decode_logits = ours.compute_logits(ours(next_token, positions, kv_cache, attn))
    expected = hf(torch.cat([prompt, next_token])[None]).logits[0, -1:]
    torch.testing.assert_close(decode_logits, expected, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_packed_prefill_chunk_and_decode_match_hf(pair):
    """One forward holding a decode of sequence A and the second prefill chunk of sequence B."""
    ours, hf = pair
    gen = torch.Generator().manual_seed(4)
    seq_a = torch.randint(0, ours.cfg.vocab_size, (18,), generator=gen)
    seq_b = torch.randint(0, ours.cfg.vocab_size, (30,), generator=gen)
    kv_cache = _kv_cache(ours)
    tables = [[7, 1], [3, 6]]
    positions, attn = _metadata(tables, [0, 0], [17, 12])  # A's first 17 tokens and B's first chunk
    ours(torch.cat([seq_a[:17], seq_b[:12]]), positions, kv_cache, attn)
    positions, attn = _metadata(tables, [17, 12], [1, 18])  # A decodes one token, B prefills the rest
    hidden = ours(torch.cat([seq_a[17:], seq_b[12:]]), positions, kv_cache, attn)
    logits = ours.compute_logits(hidden)
    torch.testing.assert_close(logits[:1], hf(seq_a[None]).logits[0, -1:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1:], hf(seq_b[None]).logits[0, 12:], atol=1e-4, rtol=1e-4)
