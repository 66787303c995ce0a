"""Greedy output equals Hugging Face transformers token for token."""

import random

import pytest

from engine import LLM, SamplingParams
from tests.engine.hf_reference import hf_greedy


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [3, 17, 40, 9, 64, 33, 1, 50, 21, 70][:n]
    return [[rng.randrange(vocab) for _ in range(length)] for length in lengths]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_single_prompt_matches_hf(arch, tiny_model_dirs, hf_models):
    llm = LLM(tiny_model_dirs[arch], dtype="float32")
    prompt = _prompts(1, llm.engine.model_config.vocab_size, seed=1)[0]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(hf_models[arch], prompt, 24)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_mixed_batch_with_chunked_prefill_matches_hf(arch, tiny_model_dirs, hf_models):
    # A 24-token budget splits the longer prompts over several steps and mixes them with decodes.
    llm = LLM(tiny_model_dirs[arch], dtype="float32", max_num_batched_tokens=24, max_num_seqs=8)
    prompts = _prompts(10, llm.engine.model_config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_models[arch], prompt, 12)
        assert out.outputs[0].finish_reason == "length"
