"""Seeded sampling is reproducible alone and in any batch; bad parameters name themselves."""

import pytest

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dirs):
    return LLM(tiny_model_dirs["llama"], dtype="float32", max_num_batched_tokens=32)


def _run(llm, prompts, params):
    return [o.outputs[0].token_ids for o in
            llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]


def test_seeded_request_same_alone_and_in_batches(llm):
    target = [5, 6, 7, 8, 9, 10]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    others = SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True)
    alone = _run(llm, [target], seeded)[0]
    assert _run(llm, [target], seeded)[0] == alone
    batch1 = _run(llm, [[1, 2, 3], target, list(range(20, 60))], [others, seeded, others])
    batch2 = _run(llm, [target, [9] * 30, [4, 4], [7, 1, 3]], [seeded, others, others, others])
    assert batch1[1] == alone
    assert batch2[0] == alone
    different = _run(llm, [target], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=99,
                                                    ignore_eos=True))[0]
    assert different != alone


def test_unseeded_requests_follow_engine_seed(tiny_model_dirs):
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    a = LLM(tiny_model_dirs["llama"], dtype="float32", seed=7)
    b = LLM(tiny_model_dirs["llama"], dtype="float32", seed=7)
    assert _run(a, [[1, 2, 3]], params) == _run(b, [[1, 2, 3]], params)


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_k": -3}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"logprobs": -1}, "logprobs"),
])
def test_invalid_sampling_params_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_prompt_too_long_is_refused(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], dtype="float32", max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [1] * 64}, SamplingParams(max_tokens=4), use_tqdm=False)


def test_unknown_engine_argument_is_named(tiny_model_dirs):
    with pytest.raises(TypeError, match="max_num_seq\\b"):
        LLM(tiny_model_dirs["llama"], max_num_seq=4)
