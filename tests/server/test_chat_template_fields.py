"""vLLM's request fields that shape the prompt: chat_template_kwargs, tools, documents, tool messages,
add_special_tokens (chat default off, completions on) and priority (accepted)."""

import pytest

from tests.server.template_model import token_ids

USER = {"role": "user", "content": "Weather in Paris?"}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_CONVERSATION = [
    USER,
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def prompt_tokens(server, body: dict, path: str = "/v1/chat/completions") -> int:
    with server.client() as client:
        response = client.post(path, json={"max_tokens": 1, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


def test_chat_template_kwargs_reach_the_template(template_server):
    plain = "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_tokens(template_server, {"messages": [USER]}) == len(token_ids(plain))
    no_thinking = {"messages": [USER], "chat_template_kwargs": {"enable_thinking": False}}
    assert prompt_tokens(template_server, no_thinking) == len(token_ids(plain + "<think></think>\n"))


def test_tool_calls_tool_results_tools_and_documents_reach_the_template(template_server):
    body = {"messages": TOOL_CONVERSATION, "tools": TOOLS, "tool_choice": "none",
            "documents": [{"title": "Forecast", "text": "sunny"}]}
    rendered = ("[docs: Forecast]\n[tools: get_weather]\n"
                "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
                "<|im_start|>assistant\n<call>get_weatherParis</call><|im_end|>\n"
                "<|im_start|>tool call_1\n18C<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_tokens(template_server, body) == len(token_ids(rendered))


def test_add_special_tokens_defaults_are_vllms(template_server):
    chat = {"messages": [USER]}
    no_bos = prompt_tokens(template_server, chat)
    assert prompt_tokens(template_server, {**chat, "add_special_tokens": True}) == no_bos + 1
    completion = {"prompt": "hello"}
    assert prompt_tokens(template_server, completion, "/v1/completions") == 1 + 5   # BOS + 5 bytes
    assert prompt_tokens(template_server, {**completion, "add_special_tokens": False}, "/v1/completions") == 5


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi", "priority": 5}),
    ("/v1/chat/completions", {"messages": [USER], "priority": -3}),
])
def test_priority_is_accepted(template_server, path, body):
    prompt_tokens(template_server, body, path)


@pytest.mark.parametrize("body, param, message", [
    ({"messages": [USER], "tools": TOOLS}, "tools",
     "Unsupported value for 'tools': tool calling is not supported; tools reach the chat template only with "
     "tool_choice \"none\"."),
    ({"messages": [USER], "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize",
     "chat_template_kwargs must not set 'tokenize': it is not a template variable."),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{"}}]}]},
     "messages.1.tool_calls.0.function.arguments", "messages.1.tool_calls.0.function.arguments is not valid JSON."),
    ({"messages": [USER], "priority": "high"}, "priority", "Invalid value for 'priority'"),
])
def test_bad_template_fields_are_400_naming_them(template_server, body, param, message):
    with template_server.client() as client:
        response = client.post("/v1/chat/completions", json={"max_tokens": 1, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(message)
