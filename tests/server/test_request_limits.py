"""Request size: bodies over --max-request-body-bytes are a 413 before they are read, prompts too long
to fit are a 400 before they are tokenized, tokenizing never stalls the event loop, and JSON nested
too deeply is a 400.

Issue: 1/3/10 MB prompts stalled every request, /health included, for 0.7/2.4/11.7 s, and a 100 MB
body grew the server to 24 GB until the kernel killed it.
"""

import http.client
import json
import socket
import threading
import time

import pytest

from engine.server.args import ConfigError, parse_serve_args
from tests.server.test_api_errors import error_of

LIMIT = 4096
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def limited_server(start_tiny_server):
    return start_tiny_server("--max-request-body-bytes", str(LIMIT))


def raw_exchange(port: int, head: str, body_parts: list[bytes]) -> http.client.HTTPResponse:
    """Send a request head and part of its body, then read the response without sending the rest."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head.encode())
    for part in body_parts:
        sock.sendall(part)
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.body = response.read()
    sock.close()
    return response


def assert_413(status: int, body: bytes) -> None:
    assert status == 413
    error = json.loads(body)["error"]
    assert error == {"message": f"The request body is larger than this server's limit of {LIMIT} bytes "
                                "(--max-request-body-bytes).",
                     "type": "invalid_request_error", "param": None, "code": None}


def test_declared_length_over_the_limit_is_413_before_the_body_is_sent(limited_server):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {100 << 20}\r\n\r\n")
    response = raw_exchange(limited_server.port, head, [])
    assert_413(response.status, response.body)
    assert response.getheader("connection") == "close"


def test_chunked_body_is_413_once_it_passes_the_limit(limited_server):
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" \
           "Transfer-Encoding: chunked\r\n\r\n"
    chunk = f"{1024:x}\r\n".encode() + b" " * 1024 + b"\r\n"
    # One chunk past the limit, and never the last chunk: the server must not wait for it.
    response = raw_exchange(limited_server.port, head, [chunk] * (LIMIT // 1024 + 1))
    assert_413(response.status, response.body)


def test_bodies_at_the_limit_are_served_and_over_it_refused(limited_server):
    with limited_server.client() as client:
        padding = LIMIT - len(json.dumps({**CHAT, "user": ""}).encode())
        at_limit = json.dumps({**CHAT, "user": "u" * padding}).encode()
        assert len(at_limit) == LIMIT
        ok = client.post("/v1/chat/completions", content=at_limit, headers={"content-type": "application/json"})
        too_big = client.post("/v1/chat/completions", content=at_limit + b" ",
                              headers={"content-type": "application/json"})
    assert ok.status_code == 200, ok.text
    assert_413(too_big.status_code, too_big.content)


def test_max_request_body_bytes_flag_and_config_key(tmp_path):
    assert parse_serve_args([]).max_request_body_bytes == 16 << 20
    assert parse_serve_args(["--max-request-body-bytes", "1000"]).max_request_body_bytes == 1000
    path = tmp_path / "serve.yaml"
    path.write_text("max_request_body_bytes: 2048\n")
    assert parse_serve_args(["--config", str(path)]).max_request_body_bytes == 2048
    with pytest.raises(ConfigError, match="max-request-body-bytes must be >= 1, got 0"):
        parse_serve_args(["--max-request-body-bytes", "0"])


class TokenizerCalls:
    """Counts the tiny server's tokenizer calls; `delay` makes each one take that long."""

    def __init__(self, server, monkeypatch, delay: float = 0.0) -> None:
        tokenizer = server.server.config.app.state.engine.tokenizer
        self.calls = 0
        for name in ("encode", "apply_chat_template"):
            monkeypatch.setattr(tokenizer, name, self._counted(getattr(tokenizer, name), delay))

    def _counted(self, method, delay: float):
        def call(*args, **kwargs):
            self.calls += 1
            time.sleep(delay)
            return method(*args, **kwargs)
        return call


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x" * 20_000}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "x" * 10_000},
                                           {"role": "user", "content": "x" * 10_000}]}, "messages"),
])
def test_prompt_too_long_to_fit_is_400_without_tokenizing(tiny_server, monkeypatch, path, body, param):
    calls = TokenizerCalls(tiny_server, monkeypatch)
    with tiny_server.client() as client:
        response = client.post(path, json=body)
    assert response.status_code == 400
    # The tiny tokenizer's longest token is `<|endoftext|>`, 13 characters: 1024 tokens hold <= 13312.
    assert error_of(response) == {
        "message": "This model's maximum context length (max_model_len) is 1024 tokens, and no text longer than "
                   f"13312 characters fits in it; got 20000 characters in '{param}'. "
                   "Please reduce the length of the prompt.",
        "type": "invalid_request_error", "param": param, "code": "context_length_exceeded"}
    assert calls.calls == 0


def health_latencies_during(server, request: dict, path: str, at_least: float) -> tuple[list[float], int]:
    """Poll /health while `request` is being served (and for `at_least` seconds): its latencies,
    and the request's status."""
    statuses = []

    def send():
        with server.client() as client:
            statuses.append(client.post(path, json=request).status_code)

    sender = threading.Thread(target=send)
    latencies = []
    with server.client() as client:
        sender.start()
        started = time.monotonic()
        while sender.is_alive() or time.monotonic() - started < at_least:
            t = time.monotonic()
            assert client.get("/health").status_code == 200
            latencies.append(time.monotonic() - t)
            time.sleep(0.02)
    sender.join()
    return latencies, statuses[0]


def test_health_answers_promptly_while_a_3mb_prompt_arrives(tiny_server):
    latencies, status = health_latencies_during(tiny_server, {"prompt": "x" * 3_000_000}, "/v1/completions", 1.0)
    assert status == 400
    assert max(latencies) < 0.5, latencies


def test_tokenizing_runs_off_the_event_loop(tiny_server, monkeypatch):
    calls = TokenizerCalls(tiny_server, monkeypatch, delay=1.5)
    latencies, status = health_latencies_during(tiny_server, CHAT, "/v1/chat/completions", 1.0)
    assert status == 200
    assert calls.calls == 2   # the template renders the text, then the text is tokenized
    assert max(latencies) < 0.5, latencies


@pytest.mark.parametrize("raw", [
    b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"messages": [{"role": "user", "content": "hi"}], "metadata": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1001,
], ids=["prompt-1000-deep", "array-100000-deep", "metadata-1000-deep"])
def test_deeply_nested_json_is_400(tiny_server, raw):
    with tiny_server.client() as client:
        for path in ("/v1/completions", "/v1/chat/completions"):
            response = client.post(path, content=raw, headers={"content-type": "application/json"})
            assert response.status_code == 400, response.text
            assert error_of(response)["message"] == "The request body is not valid JSON: it is nested too deeply."
