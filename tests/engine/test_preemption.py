"""With a KV pool too small for every request at once, requests are preempted and recomputed."""

import random

from engine import LLM, SamplingParams


def test_small_pool_preempts_and_matches_large_pool(tiny_model_dirs):
    rng = random.Random(5)
    path = tiny_model_dirs["qwen2"]
    prompts = [[rng.randrange(1, 200) for _ in range(rng.randrange(10, 40))] for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    feeds = [{"prompt_token_ids": p} for p in prompts]

    large = LLM(path, dtype="float32", block_size=16).generate(feeds, params, use_tqdm=False)
    # 12 blocks of 16 tokens: room for about two of the six ~70-token sequences at a time.
    small_llm = LLM(path, dtype="float32", block_size=16, num_gpu_blocks=12, max_model_len=128)
    small = small_llm.generate(feeds, params, use_tqdm=False)

    assert small_llm.engine.core.stats().num_preemptions > 0
    for a, b in zip(large, small):
        assert b.finished and len(b.outputs[0].token_ids) == 40
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert small_llm.engine.core.stats().kv_cache_usage == 0.0
