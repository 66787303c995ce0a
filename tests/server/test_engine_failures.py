"""A request that breaks an engine step fails alone; an engine that dies makes the server unhealthy.

Issue: `stop_token_ids: [99999999]` with `min_tokens` raised IndexError inside a step, which killed
the engine thread: that request and every later one got a 503 until the process was restarted,
while /health and the process stayed up. Here a bad value is a 400 before it reaches the engine, a
step that raises anyway fails only its requests with a 500, and an engine whose steps keep failing
dies for good: /health turns 503 (the CLI then exits, see test_serve_engine_death.py).
"""

import json

import pytest

from engine.server.async_engine import MAX_CONSECUTIVE_STEP_FAILURES
from tests.server.test_api_errors import error_of
from tests.server.test_disconnect_and_metrics import metrics_of

SAY_HI = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
HUGE = 10**30


@pytest.mark.parametrize("extra, param, message", [
    ({"stop_token_ids": [99999999], "min_tokens": 2}, "stop_token_ids",
     "stop_token_ids must lie in [0, 259); got 99999999."),
    ({"stop_token_ids": [99999999], "min_tokens": 2, "stream": True}, "stop_token_ids",
     "stop_token_ids must lie in [0, 259); got 99999999."),
    ({"stop_token_ids": [HUGE], "min_tokens": 2}, "stop_token_ids.0", "less than or equal to 9223372036854775807"),
    ({"top_k": HUGE}, "top_k", "less than or equal to 9223372036854775807"),
    ({"top_k": 2**40}, "top_k", "top_k must be at most 2147483647, got 1099511627776."),
    ({"seed": HUGE}, "seed", "less than or equal to 9223372036854775807"),
    ({"min_tokens": HUGE}, "min_tokens", "less than or equal to 9223372036854775807"),
    ({"max_completion_tokens": HUGE}, "max_completion_tokens", "less than or equal to 9223372036854775807"),
], ids=["stop-id-past-vocab", "stop-id-past-vocab-streamed", "stop-id-past-int64", "top-k-past-int64",
        "top-k-past-int32", "seed-past-int64", "min-tokens-past-int64", "max-completion-tokens-past-int64"])
def test_values_that_broke_a_step_are_400_and_the_engine_keeps_serving(tiny_server, extra, param, message):
    with tiny_server.client() as client:
        bad = client.post("/v1/chat/completions", json={**SAY_HI, **extra})
        good = client.post("/v1/chat/completions", json=SAY_HI)
        health = client.get("/health")
    assert bad.status_code == 400, bad.text
    assert error_of(bad)["param"] == param
    assert message in error_of(bad)["message"]
    assert good.status_code == 200, good.text
    assert health.status_code == 200


def test_an_integer_too_long_to_parse_is_400(tiny_server):
    with tiny_server.client() as client:
        response = client.post("/v1/completions", content=b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}",
                               headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert error_of(response)["message"].startswith("The request body is not valid JSON: Exceeds the limit")


class StepFaults:
    """Makes the engine core's next `count` steps raise, as a bug in a step would."""

    def __init__(self, server, monkeypatch) -> None:
        self.core = server.server.config.app.state.engine.core
        self.remaining = 0
        real_step = self.core.step

        def step():
            if self.remaining > 0:
                self.remaining -= 1
                raise RuntimeError("injected step failure")
            return real_step()

        monkeypatch.setattr(self.core, "step", step)

    def fail_next(self, count: int = 1) -> None:
        self.remaining = count


def test_a_failed_step_fails_its_requests_with_500_and_the_next_request_works(start_tiny_server, monkeypatch):
    server = start_tiny_server()
    faults = StepFaults(server, monkeypatch)
    long = {"prompt": "a", "max_tokens": 1000, "ignore_eos": True, "temperature": 0, "stream": True}
    with server.client() as client:
        idle = metrics_of(client)
        with client.stream("POST", "/v1/completions", json=long) as response:
            lines = (line for line in response.iter_lines() if line)
            assert next(lines).startswith("data: ")
            faults.fail_next()  # the step now running on the engine thread is the next one to fail
            rest = list(lines)
        assert response.status_code == 200
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][len("data: "):])["error"]
        assert error["type"] == "server_error"
        assert error["message"] == ("Internal server error: the engine step running this request failed with "
                                    "RuntimeError: injected step failure")

        faults.fail_next()
        failed = client.post("/v1/chat/completions", json=SAY_HI)
        assert failed.status_code == 500
        assert error_of(failed)["message"].endswith("failed with RuntimeError: injected step failure")

        after = client.post("/v1/chat/completions", json=SAY_HI)
        assert after.status_code == 200, after.text
        assert client.get("/health").status_code == 200
        # The aborted requests gave their KV blocks back.
        assert metrics_of(client)["vllm:kv_cache_usage_perc"] == idle["vllm:kv_cache_usage_perc"]


def test_steps_that_keep_failing_kill_the_engine_and_health_turns_503(start_tiny_server, monkeypatch):
    server = start_tiny_server()
    faults = StepFaults(server, monkeypatch)
    faults.fail_next(MAX_CONSECUTIVE_STEP_FAILURES)
    with server.client() as client:
        assert client.get("/health").status_code == 200
        for _ in range(MAX_CONSECUTIVE_STEP_FAILURES - 1):
            assert client.post("/v1/chat/completions", json=SAY_HI).status_code == 500
        last = client.post("/v1/chat/completions", json=SAY_HI)
        assert last.status_code == 503
        assert f"{MAX_CONSECUTIVE_STEP_FAILURES} engine steps in a row failed" in error_of(last)["message"]
        health = client.get("/health")
        assert health.status_code == 503
        assert error_of(health)["type"] == "service_unavailable_error"
        assert client.post("/v1/chat/completions", json=SAY_HI).status_code == 503
