"""`long_prefill_token_threshold` through the offline API: a long prompt arriving while others decode is
computed over several steps of at most the threshold, with the same greedy tokens as without it."""

import random

import pytest

from engine import LLM, SamplingParams

THRESHOLD = 16
DECODE = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def run(path: str, **kwargs) -> tuple[list[list[int]], list[int]]:
    """Two 8-token prompts start decoding; a 50-token prompt joins after two steps.
    Returns each request's output tokens and each step's scheduled token count."""
    rng = random.Random(7)
    llm = LLM(path, dtype="float32", block_size=16, **kwargs)
    vocab = llm.engine.model_config.vocab_size
    short = [[rng.randrange(vocab) for _ in range(8)] for _ in range(2)]
    long = [rng.randrange(vocab) for _ in range(50)]
    core = llm.engine.core
    core.step_records = []
    ids = [llm.engine.add_request({"prompt_token_ids": p}, DECODE, final_only=True) for p in short]
    outputs = {}
    for step in range(100):
        if step == 2:
            ids.append(llm.engine.add_request({"prompt_token_ids": long}, LONG, final_only=True))
        if not llm.engine.has_unfinished_requests():
            break
        outputs.update((out.request_id, out.outputs[0].token_ids) for out in llm.engine.step() if out.finished)
    return [list(outputs[rid]) for rid in ids], [r.num_tokens for r in core.step_records]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_long_prompt_beside_decodes_is_split_and_greedy_tokens_do_not_change(tiny_model_dirs, async_scheduling):
    path = tiny_model_dirs["llama"]
    plain_tokens, plain_steps = run(path, async_scheduling=async_scheduling)
    split_tokens, split_steps = run(path, async_scheduling=async_scheduling, long_prefill_token_threshold=THRESHOLD)
    # Without the threshold the 50-token prompt is one step beside the two decodes; with it, steps of
    # 16 + 16 + 16 + 2 prompt tokens (and the two decodes each time) before its own decode starts.
    assert plain_steps[:5] == [16, 2, 52, 3, 3]
    assert split_steps[:8] == [16, 2, 18, 18, 18, 4, 3, 3]
    assert split_tokens == plain_tokens
    assert [len(t) for t in split_tokens] == [12, 12, 4]


@pytest.mark.parametrize("value", [-1, True, 2.5, "16"])
def test_a_bad_threshold_is_refused_by_name(tiny_model_dirs, value):
    with pytest.raises(ValueError, match=rf"long_prefill_token_threshold must be an integer >= 0 \(0 = off\), "
                                         rf"got {value!r}"):
        LLM(tiny_model_dirs["llama"], long_prefill_token_threshold=value)
