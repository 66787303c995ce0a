import pytest

from engine.sampling import SamplingParams


def test_defaults_are_vllms():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.seed, p.logprobs) == (16, 0, None, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.stop == [] and p.stop_token_ids == []
    assert (p.ignore_eos, p.skip_special_tokens, p.include_stop_str_in_output) == (
        False,
        True,
        False,
    )


def test_stop_is_normalised_to_a_list():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_boundary_values_are_accepted():
    p = SamplingParams(
        temperature=0,
        top_p=1.0,
        top_k=-1,
        min_p=1.0,
        max_tokens=None,
        min_tokens=0,
        presence_penalty=-2,
        frequency_penalty=2,
        repetition_penalty=0.01,
        logprobs=20,
        seed=-5,
        stop_token_ids=[0, 2],
    )
    assert p.greedy and p.uses_penalties
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4


@pytest.mark.parametrize(
    "kwargs, name, expected",
    [
        ({"n": 2}, "n > 1", "not supported"),
        ({"n": 0}, "n must", ">= 1"),
        ({"temperature": -0.1}, "temperature", ">= 0"),
        ({"temperature": float("nan")}, "temperature", ">= 0"),
        ({"top_p": 0.0}, "top_p", "(0, 1]"),
        ({"top_p": 1.5}, "top_p", "(0, 1]"),
        ({"top_k": -2}, "top_k", ">= 1"),
        ({"top_k": 1.5}, "top_k", ">= 1"),
        ({"min_p": -0.1}, "min_p", "[0, 1]"),
        ({"min_p": 1.1}, "min_p", "[0, 1]"),
        ({"max_tokens": 0}, "max_tokens", ">= 1"),
        ({"min_tokens": -1}, "min_tokens", ">= 0"),
        ({"max_tokens": 3, "min_tokens": 4}, "min_tokens", "<= max_tokens"),
        ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
        ({"frequency_penalty": -2.5}, "frequency_penalty", "[-2, 2]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty", "> 0"),
        ({"logprobs": 21}, "logprobs", "[0, 20]"),
        ({"logprobs": -1}, "logprobs", "[0, 20]"),
        ({"seed": 1.5}, "seed", "integer"),
        ({"stop": ""}, "stop", "non-empty"),
        ({"stop": ["ok", ""]}, "stop", "non-empty"),
        ({"stop_token_ids": [1, "2"]}, "stop_token_ids", "integers"),
        ({"stop_token_ids": [-1]}, "stop_token_ids", "integers"),
    ],
)
def test_invalid_parameter_is_named_in_the_error(kwargs, name, expected):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    message = str(err.value)
    assert message.startswith(name) and expected in message
