"""Async scheduling (the step after next is planned before the last one's tokens are read) must not
change a single token, and must hand every device slot back when requests finish."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.engine.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("async") / "llama", "llama")


def _prompts(n: int) -> list[dict]:
    return [{"prompt_token_ids": [(7 * i + 3 * j) % 250 + 3 for j in range(5 + 3 * i)]} for i in range(n)]


def _run(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_async_equals_sync_tokens_and_stops(model_dir):
    """Greedy, seeded sampling, stop tokens, min_tokens and penalties: the same tokens either way."""
    sync = LLM(model_dir, async_scheduling=False, max_num_seqs=4, max_num_batched_tokens=24)
    asyn = LLM(model_dir, async_scheduling=True, max_num_seqs=4, max_num_batched_tokens=24)
    prompts = _prompts(10)
    cases = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[40, 41, 42, 43, 44], min_tokens=2),
        SamplingParams(temperature=0.8, seed=1, max_tokens=10, repetition_penalty=1.3, presence_penalty=0.5,
                       ignore_eos=True),
    ]
    for params in cases:
        want = _run(sync, prompts, params)
        assert _run(asyn, prompts, params) == want
        assert all(len(t) <= params.max_tokens for t in want)


def test_slots_return_after_each_generate(model_dir):
    """As many requests as slots, three times over: every finished request gives its slot back."""
    llm = LLM(model_dir, max_num_seqs=3)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = _run(llm, _prompts(3), params)
    for _ in range(2):
        assert _run(llm, _prompts(3), params) == first
    assert llm.engine.core.stats().kv_cache_usage == 0.0
