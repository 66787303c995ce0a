"""The official `openai` client against SmolLM2: the same text as the offline API for the same greedy request."""

import openai
import pytest

from tests.server.conftest import SMOLLM2_CASES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(smollm2):
    server, _ = smollm2
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def _case(name):
    kind, prompt, max_tokens = SMOLLM2_CASES[name]
    return prompt, max_tokens


def test_completion(client, smollm2):
    prompt, max_tokens = _case("completion")
    out = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=prompt, max_tokens=max_tokens,
                                    temperature=0)
    assert out.choices[0].text == smollm2[1]["completion"]
    assert out.usage.completion_tokens == max_tokens or out.choices[0].finish_reason == "stop"


def test_completion_stream(client, smollm2):
    prompt, max_tokens = _case("completion")
    stream = client.completions.create(prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                       model="SmolLM2-135M-Instruct.Q4_1")
    assert "".join(chunk.choices[0].text for chunk in stream) == smollm2[1]["completion"]


def test_chat(client, smollm2):
    messages, max_tokens = _case("chat")
    out = client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=messages,
                                         max_completion_tokens=max_tokens, temperature=0)
    assert out.choices[0].message.content == smollm2[1]["chat"]
    assert "Paris" in out.choices[0].message.content
    assert out.choices[0].finish_reason == "stop"


def test_chat_stream_with_usage(client, smollm2):
    messages, max_tokens = _case("chat")
    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=messages,
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == smollm2[1]["chat"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
