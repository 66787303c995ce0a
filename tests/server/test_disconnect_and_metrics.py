"""A client that goes away frees its request's KV blocks; /metrics parses and carries vLLM's names."""

import socket
import time

from prometheus_client.parser import text_string_to_metric_families

LONG = {"prompt": "a", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}


def metrics_of(client) -> dict[str, float]:
    """Every sample of /metrics, keyed by sample name (plus finished_reason where present)."""
    samples = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            key = sample.name + (f"[{sample.labels['finished_reason']}]" if "finished_reason" in sample.labels else "")
            if sample.name.endswith("_bucket"):
                continue
            samples[key] = sample.value
    return samples


def wait_until(client, condition, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        samples = metrics_of(client)
        if condition(samples):
            return samples
        assert time.monotonic() < deadline, f"metrics never satisfied the condition: {samples}"
        time.sleep(0.02)


def test_disconnect_mid_stream_aborts_and_frees_blocks(start_tiny_server):
    server = start_tiny_server()
    with server.client() as client:
        idle = metrics_of(client)
        assert idle["vllm:num_requests_running"] == 0
        with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            busy = wait_until(client, lambda m: m["vllm:kv_cache_usage_perc"] > idle["vllm:kv_cache_usage_perc"])
            assert busy["vllm:num_requests_running"] == 1
        after = wait_until(client, lambda m: m["vllm:num_requests_running"] == 0)
        assert after["vllm:kv_cache_usage_perc"] == idle["vllm:kv_cache_usage_perc"]
        assert after["vllm:request_success_total[abort]"] == 1
        assert after["vllm:generation_tokens_total"] < 1000


def test_disconnect_while_waiting_for_a_whole_response_aborts(start_tiny_server):
    server = start_tiny_server()
    with server.client() as client:
        idle = metrics_of(client)
        body = (b'{"prompt": "a", "max_tokens": 1000, "ignore_eos": true}')
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(client, lambda m: m["vllm:num_requests_running"] == 1)
        after = wait_until(client, lambda m: m["vllm:num_requests_running"] == 0)
        assert after["vllm:kv_cache_usage_perc"] == idle["vllm:kv_cache_usage_perc"]
        assert after["vllm:request_success_total[abort]"] == 1
        assert after["vllm:generation_tokens_total"] < 1000


VLLM_NAMES = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds", "vllm:prompt_tokens",
    "vllm:generation_tokens", "vllm:num_preemptions",
]


def test_metrics_parse_with_vllm_names_and_count_requests(start_tiny_server):
    server = start_tiny_server("--served-model-name", "tiny-chat")
    prompt = "Shared prefix that is longer than two blocks of sixteen tokens each. "
    with server.client() as client:
        for _ in range(2):
            response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0,
                                                            "model": "tiny-chat"})
            assert response.status_code == 200
            assert response.json()["model"] == "tiny-chat"
        text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(VLLM_NAMES) <= set(families)
    for name in VLLM_NAMES:
        assert all(s.labels["model_name"] == "tiny-chat" for s in families[name].samples)
    samples = {s.name: s.value for f in families.values() for s in f.samples if not s.name.endswith("_bucket")}
    num_prompt = len(prompt)  # the tiny tokenizer is one token per byte
    assert samples["vllm:generation_tokens_total"] == 10
    assert samples["vllm:prefix_cache_queries_total"] == 2 * num_prompt
    assert samples["vllm:prefix_cache_hits_total"] == (num_prompt // 16) * 16
    assert samples["vllm:prompt_tokens_total"] == 2 * num_prompt  # as vLLM: cached prompt tokens count too
    assert samples["vllm:num_preemptions_total"] == 0
    assert samples["vllm:time_to_first_token_seconds_count"] == 2
    assert samples["vllm:e2e_request_latency_seconds_count"] == 2
    assert samples["vllm:inter_token_latency_seconds_count"] == 8
    assert '_created' not in text


def test_models_health_version(tiny_server):
    with tiny_server.client() as client:
        models = client.get("/v1/models").json()
        health = client.get("/health")
        version = client.get("/version").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"], m["max_model_len"]) for m in models["data"]] == \
        [("llama", "model", "tierkv", 1024)]
    assert health.status_code == 200
    assert version == {"version": "0.1.0"}
