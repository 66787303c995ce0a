"""A request sharing a cached prefix computes only its suffix, with the same output as cold."""

import random

from engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_shared_prefix_computes_only_suffix(tiny_model_dirs):
    rng = random.Random(3)
    path = tiny_model_dirs["llama"]
    llm = LLM(path, dtype="float32", block_size=16)
    vocab = llm.engine.model_config.vocab_size
    prefix = [rng.randrange(vocab) for _ in range(3 * 16 + 5)]  # 3 full blocks and a partial one
    first = prefix + [rng.randrange(vocab) for _ in range(7)]
    second = prefix + [rng.randrange(vocab) for _ in range(11)]

    llm.generate({"prompt_token_ids": first}, GREEDY, use_tqdm=False)
    before = llm.engine.core.stats()
    warm = llm.generate({"prompt_token_ids": second}, GREEDY, use_tqdm=False)[0]
    after = llm.engine.core.stats()

    assert warm.num_cached_tokens == 48
    # The prompt computes only what follows the 3 cached blocks; each decode step computes one token.
    assert after.computed_tokens - before.computed_tokens == (len(second) - 48) + (GREEDY.max_tokens - 1)
    assert after.prefix_cache_hits - before.prefix_cache_hits == 48

    cold = LLM(path, dtype="float32", block_size=16, enable_prefix_caching=False)
    expected = cold.generate({"prompt_token_ids": second}, GREEDY, use_tqdm=False)[0]
    assert expected.num_cached_tokens == 0
    assert warm.outputs[0].token_ids == expected.outputs[0].token_ids


def test_fully_cached_prompt_still_computes_last_token(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["qwen3"], dtype="float32", block_size=16)
    prompt = list(range(1, 33))  # exactly two blocks
    a = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0]
    b = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0]
    assert b.num_cached_tokens == 16
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
