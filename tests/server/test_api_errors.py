"""Every client mistake gets its status code and an OpenAI-shaped error naming the problem; never a 500."""

import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("path, body, param, message", [
    ("/v1/completions", {"prompt": "hi", "n": 2}, "n", "Unsupported value for 'n': only n=1 is supported."),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of", "only best_of=1 is supported"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, "echo", "echo is not supported"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt", "only one prompt per request is supported"),
    ("/v1/completions", {"prompt": ""}, "prompt", "prompt must not be empty."),
    ("/v1/completions", {"prompt": [5, 100000]}, "prompt", "prompt token ids must lie in [0, 259); got 100000."),
    ("/v1/completions", {"prompt": "hi", "frobnicate": 1}, "frobnicate", "Unrecognized request argument supplied: frobnicate"),
    ("/v1/completions", {"max_tokens": 3}, "prompt", "Missing required parameter: 'prompt'."),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature", "temperature must be a number >= 0, got -1.0."),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p", "top_p must be a number in (0, 1], got 0.0."),
    ("/v1/completions", {"prompt": "hi", "top_k": -5}, "top_k", "top_k must be an integer >= 1, or 0 or -1"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "max_tokens must be at least 1, got 0."),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, "presence_penalty", "presence_penalty must be a number in [-2, 2]"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs", "logprobs must be an integer in [0, 20] or None, got 21."),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options",
     "stream_options is only allowed when stream is true."),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature", "Invalid value for 'temperature'"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools",
     "tool calling is not supported"),
    ("/v1/chat/completions", {**CHAT, "n": 3}, "n", "only n=1 is supported"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, "response_format", "is supported"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs", "top_logprobs requires logprobs to be true."),
    ("/v1/chat/completions", {"messages": []}, "messages", "List should have at least 1 item"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "Input should be"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content.0.type", "Input should be 'text'"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 2000}, "max_completion_tokens",
     "This model's maximum context length is 1024 tokens. However, you requested"),
])
def test_bad_request_is_400_naming_the_parameter(tiny_server, path, body, param, message):
    with tiny_server.client() as client:
        response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert message in error["message"]


def test_prompt_longer_than_max_model_len_is_400(tiny_server):
    with tiny_server.client() as client:
        too_long = client.post("/v1/completions", json={"prompt": "x" * 1020, "max_tokens": 16})
        no_room = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 1100}]})
    assert too_long.status_code == 400
    assert error_of(too_long)["message"] == (
        "This model's maximum context length is 1024 tokens. However, you requested 1036 tokens "
        "(1020 in the prompt, 16 in the completion). Please reduce the length of the prompt or completion.")
    assert error_of(too_long)["code"] == "context_length_exceeded"
    assert no_room.status_code == 400 and error_of(no_room)["param"] == "messages"


@pytest.mark.parametrize("raw, message", [
    (b"{not json", "The request body is not valid JSON: Expecting property name enclosed in double quotes"),
    (b"[1, 2]", "The request body must be a JSON object, got list."),
    (b"\xff\xfe", "The request body is not valid JSON"),
    (b"", "The request body is not valid JSON"),
])
def test_malformed_json_is_400(tiny_server, raw, message):
    with tiny_server.client() as client:
        for path in ("/v1/completions", "/v1/chat/completions"):
            response = client.post(path, content=raw, headers={"content-type": "application/json"})
            assert response.status_code == 400
            assert error_of(response)["message"].startswith(message)


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {**CHAT, "model": "gpt-17"}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "model": "gpt-17"}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "model": "gpt-17", "stream": True}),
])
def test_unknown_model_is_404_as_vllm_answers_it(tiny_server, path, body):
    with tiny_server.client() as client:
        response = client.post(path, json=body)
        assert response.status_code == 404
        assert response.json() == {"error": {"message": "The model `gpt-17` does not exist.", "type": "NotFoundError",
                                              "param": None, "code": 404}}
        assert client.post(path, json={**body, "model": "llama"}).status_code == 200


def test_unknown_path_and_method_are_openai_shaped(tiny_server):
    with tiny_server.client() as client:
        missing = client.get("/v1/engines")
        wrong_method = client.get("/v1/completions")
    assert missing.status_code == 404 and error_of(missing)["message"] == "Not Found"
    assert wrong_method.status_code == 405 and error_of(wrong_method)["message"] == "Method Not Allowed"


def test_api_key_is_required_on_v1_when_set(start_tiny_server):
    server = start_tiny_server("--api-key", "s3cret")
    with server.client() as client:
        missing = client.get("/v1/models")
        wrong = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"})
        right = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer s3cret"})
        health = client.get("/health")
    for response in (missing, wrong):
        assert response.status_code == 401
        assert error_of(response)["code"] == "invalid_api_key"
    assert right.status_code == 200 and right.json()["object"] == "chat.completion"
    assert health.status_code == 200


def gauge(client, name: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == name:
            return family.samples[0].value
    raise KeyError(name)


def wait_for_gauge(client, name: str, value: float) -> None:
    deadline = time.monotonic() + 30
    while gauge(client, name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.01)


def test_full_waiting_queue_is_503_with_retry_after(start_tiny_server):
    server = start_tiny_server("--max-num-seqs", "1", "--max-waiting-requests", "1")
    # One request runs (max-num-seqs 1) for ~1000 steps, the next one waits behind it.
    long_request = {"prompt": "a", "max_tokens": 1000, "ignore_eos": True, "temperature": 0, "stream": True}
    stop = threading.Event()
    statuses = []

    def hold_one_stream():
        with server.client() as client, client.stream("POST", "/v1/completions", json=long_request) as response:
            statuses.append(response.status_code)
            stop.wait(60)

    holders = [threading.Thread(target=hold_one_stream) for _ in range(2)]
    try:
        with server.client() as client:
            holders[0].start()
            wait_for_gauge(client, "vllm:num_requests_running", 1)
            holders[1].start()
            wait_for_gauge(client, "vllm:num_requests_waiting", 1)
            response = client.post("/v1/completions", json={"prompt": "b", "max_tokens": 2})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert error_of(response)["message"] == "The server is overloaded: 1 requests are already waiting. Retry later."
        assert error_of(response)["code"] == "overloaded"
        assert statuses == [200, 200]
    finally:
        stop.set()
        for holder in holders:
            holder.join()
