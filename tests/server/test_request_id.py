"""X-Request-Id: echoed on every response, the completion's id is built from it; one id runs once at a time."""

import json
import re

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
COMPLETION = {"prompt": "hi", "max_tokens": 2, "temperature": 0}


def test_the_clients_id_is_echoed_and_names_the_completion(tiny_server):
    with tiny_server.client() as client:
        chat = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "trace-42"})
        completion = client.post("/v1/completions", json=COMPLETION, headers={"X-Request-Id": "trace-43"})
    assert chat.status_code == 200 and completion.status_code == 200
    assert chat.headers["x-request-id"] == "trace-42" and chat.json()["id"] == "chatcmpl-trace-42"
    assert completion.headers["x-request-id"] == "trace-43" and completion.json()["id"] == "cmpl-trace-43"


def test_every_streamed_chunk_carries_the_clients_id(tiny_server):
    with tiny_server.client() as client, client.stream(
            "POST", "/v1/completions", json={**COMPLETION, "stream": True}, headers={"X-Request-Id": "s-1"}) as response:
        assert response.headers["x-request-id"] == "s-1"
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert {json.loads(event)["id"] for event in events[:-1]} == {"cmpl-s-1"}


def test_without_the_header_the_generated_id_comes_back_in_it(tiny_server):
    with tiny_server.client() as client:
        response = client.post("/v1/completions", json=COMPLETION)
        health = client.get("/health")
    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert response.json()["id"] == f"cmpl-{request_id}"
    assert re.fullmatch(r"[0-9a-f]{32}", health.headers["x-request-id"])


def test_errors_echo_the_id_too(tiny_server):
    with tiny_server.client() as client:
        response = client.post("/v1/completions", json={"prompt": ""}, headers={"X-Request-Id": "bad-1"})
    assert response.status_code == 400 and response.headers["x-request-id"] == "bad-1"


def test_an_id_that_is_already_running_is_400(tiny_server):
    long_request = {"prompt": "a", "max_tokens": 1000, "ignore_eos": True, "temperature": 0, "stream": True}
    with tiny_server.client() as client:
        with client.stream("POST", "/v1/completions", json=long_request, headers={"X-Request-Id": "dup"}) as first:
            lines = first.iter_lines()   # kept: a discarded iterator closes the connection, aborting the request
            next(lines)                   # the first chunk: the request is running
            second = client.post("/v1/completions", json=COMPLETION, headers={"X-Request-Id": "dup"})
        assert second.status_code == 400
        assert second.json()["error"]["message"] == "Request id 'cmpl-dup' is already running; send another X-Request-Id."
        again = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "dup"})
    assert again.status_code == 200 and again.json()["id"] == "chatcmpl-dup"
