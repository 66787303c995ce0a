"""POST /tokenize and /detokenize with vLLM's bodies; the ids are exactly what the completion endpoints use."""

import pytest

from tests.server.test_chat_template_fields import TOOL_CONVERSATION, TOOLS, USER
from tests.server.template_model import token_ids

BOS = 256


def post(server, path: str, body: dict):
    with server.client() as client:
        return client.post(path, json=body)


def test_tokenize_a_prompt(template_server):
    assert post(template_server, "/tokenize", {"prompt": "hi"}).json() == {
        "count": 3, "max_model_len": 1024, "tokens": [BOS, 104, 105]}
    assert post(template_server, "/tokenize", {"prompt": "hi", "add_special_tokens": False, "model": "llama"}).json() == {
        "count": 2, "max_model_len": 1024, "tokens": [104, 105]}
    assert post(template_server, "/tokenize", {"prompt": "hi", "return_token_strs": True}).json() == {
        "count": 3, "max_model_len": 1024, "tokens": [BOS, 104, 105], "token_strs": ["<|endoftext|>", "h", "i"]}


def test_tokenize_a_conversation_as_chat_renders_it(template_server):
    generation = token_ids("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")
    assert post(template_server, "/tokenize", {"messages": [USER]}).json() == {
        "count": len(generation), "max_model_len": 1024, "tokens": generation}
    no_prompt = token_ids("<|im_start|>user\nWeather in Paris?<|im_end|>\n")
    assert post(template_server, "/tokenize", {"messages": [USER], "add_generation_prompt": False}).json()["tokens"] \
        == no_prompt
    thinking_off = {"messages": [USER], "chat_template_kwargs": {"enable_thinking": False}, "add_special_tokens": True}
    assert post(template_server, "/tokenize", thinking_off).json()["tokens"] \
        == [BOS, *generation, *token_ids("<think></think>\n")]


def test_tokenize_renders_tools_and_tool_messages(template_server):
    body = {"messages": TOOL_CONVERSATION, "tools": TOOLS}
    rendered = ("[tools: get_weather]\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
                "<|im_start|>assistant\n<call>get_weatherParis</call><|im_end|>\n"
                "<|im_start|>tool call_1\n18C<|im_end|>\n<|im_start|>assistant\n")
    assert post(template_server, "/tokenize", body).json()["tokens"] == token_ids(rendered)


def test_tokenize_counts_what_chat_completions_sends(template_server):
    body = {"messages": TOOL_CONVERSATION, "tools": TOOLS, "tool_choice": "none"}
    count = post(template_server, "/tokenize", {"messages": TOOL_CONVERSATION, "tools": TOOLS}).json()["count"]
    chat = post(template_server, "/v1/chat/completions", {**body, "max_tokens": 1})
    assert chat.json()["usage"]["prompt_tokens"] == count


def test_detokenize(template_server):
    assert post(template_server, "/detokenize", {"tokens": [104, 105]}).json() == {"prompt": "hi"}
    assert post(template_server, "/detokenize", {"tokens": [BOS, 104], "model": "llama"}).json() == {
        "prompt": "<|endoftext|>h"}
    assert post(template_server, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize("path, body, status, error", [
    ("/detokenize", {"tokens": [104, 259]}, 400,
     {"message": "tokens must lie in [0, 259); got 259.", "type": "invalid_request_error", "param": "tokens",
      "code": None}),
    ("/detokenize", {"tokens": [-1]}, 400,
     {"message": "tokens must lie in [0, 259); got -1.", "type": "invalid_request_error", "param": "tokens",
      "code": None}),
    ("/detokenize", {"tokens": "hi"}, 400,
     {"message": "Invalid value for 'tokens': Input should be a valid list", "type": "invalid_request_error",
      "param": "tokens", "code": None}),
    ("/tokenize", {}, 400,
     {"message": "Missing required parameter: 'prompt'.", "type": "invalid_request_error", "param": "prompt",
      "code": None}),
    ("/tokenize", {"messages": [{"role": "robot"}]}, 400,
     {"message": "Invalid value for 'messages.0.role': Input should be 'system', 'developer', 'user', 'assistant' "
                 "or 'tool'", "type": "invalid_request_error", "param": "messages.0.role", "code": None}),
    ("/tokenize", {"prompt": "hi", "model": "gpt-17"}, 404,
     {"message": "The model `gpt-17` does not exist.", "type": "NotFoundError", "param": None, "code": 404}),
    ("/detokenize", {"tokens": [1], "model": "gpt-17"}, 404,
     {"message": "The model `gpt-17` does not exist.", "type": "NotFoundError", "param": None, "code": 404}),
])
def test_bad_bodies(template_server, path, body, status, error):
    response = post(template_server, path, body)
    assert response.status_code == status
    assert response.json() == {"error": error}
