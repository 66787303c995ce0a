"""vLLM's cache series on /metrics: the offload store as vLLM's external prefix cache, every series
at 0 before the first request, process_*/python_* collectors, and vLLM's periodic stats line."""

from __future__ import annotations

import json
import logging
import re
import time

from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import RunningServer, greedy

MODEL = "tiny-cache"
# save_all, the CPU tier only; every block found is loaded (no cost model), so the counts are exact.
KV_CONFIG = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
             "kv_connector_extra_config": {"block_size": 256, "cpu_bytes_to_use": "64MiB",
                                           "load_cost_model": False}}
# One token per byte: 600 tokens = 2 full 256-token store blocks and a partial one.
PROMPT = "".join(chr(ord("a") + (7 * i) % 26) for i in range(600))
# 48 GPU blocks of 16 tokens = 768 tokens: OTHER (760 tokens + 5 generated) needs every one of them,
# so it evicts all of PROMPT's blocks from the GPU prefix cache.
OTHER = "".join(chr(ord("a") + (11 * i + 3) % 26) for i in range(760))
SMALL_POOL = ("--num-gpu-blocks-override", "48", "--max-model-len", "768")


def samples(client) -> dict[str, float]:
    """Every sample but histogram buckets: 'name{label=value,...}' (model_name left out) -> value."""
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name.endswith("_bucket"):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_for(client, condition, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while not condition(values := samples(client)):
        assert time.monotonic() < deadline, f"/metrics never got there: {values}"
        time.sleep(0.05)
    return values


def complete(client, prompt: str) -> str:
    response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


EXPECTED_AT_ZERO = [
    "vllm:external_prefix_cache_queries_total", "vllm:external_prefix_cache_hits_total",
    "vllm:prompt_tokens_cached_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
    "vllm:request_success_total{finished_reason=stop}", "vllm:request_success_total{finished_reason=length}",
    "vllm:request_success_total{finished_reason=abort}",
    "vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
    "tierkv_offload_hit_tokens_total{tier=memory}", "tierkv_offload_skipped_load_tokens_total{tier=memory}",
]


def test_fresh_server_shows_every_series_at_zero(start_tiny_server):
    server = start_tiny_server("--served-model-name", MODEL, "--kv-transfer-config", json.dumps(KV_CONFIG))
    with server.client() as client:
        text = client.get("/metrics").text
        values = samples(client)
    for name in EXPECTED_AT_ZERO:
        assert values.get(name) == 0.0, f"{name}: {values.get(name)}"
    assert f'vllm:external_prefix_cache_hits_total{{model_name="{MODEL}"}} 0.0' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["vllm:external_prefix_cache_queries"].type == "counter"
    assert families["vllm:prompt_tokens_cached"].type == "counter"
    assert all(s.labels == {"model_name": MODEL} for name in ("vllm:external_prefix_cache_queries",
                                                              "vllm:external_prefix_cache_hits",
                                                              "vllm:prompt_tokens_cached")
               for s in families[name].samples)
    # prometheus_client's default collectors, as on vLLM's /metrics.
    assert values["process_cpu_seconds_total"] > 0
    assert values["process_resident_memory_bytes"] > 0
    assert "python_gc_collections_total{generation=0}" in values
    assert any(name.startswith("python_info") for name in values)
    assert "_created" not in text


def test_server_without_offloading_has_external_series_at_zero(tiny_server):
    with tiny_server.client() as client:
        complete(client, "Hello there, a prompt of a few tokens.")
        values = samples(client)
    assert values["vllm:external_prefix_cache_queries_total"] == 0
    assert values["vllm:external_prefix_cache_hits_total"] == 0
    assert "process_cpu_seconds_total" in values


def test_prompt_loaded_from_the_store_counts_as_an_external_hit(start_tiny_server, tiny_llm):
    server = start_tiny_server("--served-model-name", MODEL, "--kv-transfer-config", json.dumps(KV_CONFIG),
                               *SMALL_POOL)
    reference = tiny_llm.generate(PROMPT, greedy(5), use_tqdm=False)[0].outputs[0].text
    with server.client() as client:
        assert complete(client, PROMPT) == reference
        wait_for(client, lambda v: v["tierkv_offload_saved_blocks_total"] >= 2)
        complete(client, OTHER)
        wait_for(client, lambda v: v["tierkv_offload_saved_blocks_total"] >= 4)
        # PROMPT again: none of it on the GPU any more, its 2 full blocks in the store.
        assert complete(client, PROMPT) == reference
        values = wait_for(client, lambda v: v["vllm:request_success_total{finished_reason=length}"] == 3
                          and v.get("tierkv_offload_loaded_tokens_total", 0) == 512)
    assert values["vllm:prefix_cache_hits_total"] == 0
    assert values["vllm:prefix_cache_queries_total"] == 600 + 760 + 600
    # Every admitted request queries the external cache for its tokens beyond the GPU hit (none).
    assert values["vllm:external_prefix_cache_queries_total"] == 600 + 760 + 600
    # The second PROMPT found its 2 blocks (512 tokens) and loaded them.
    assert values["vllm:external_prefix_cache_hits_total"] == 512
    assert values["tierkv_offload_hit_tokens_total{tier=memory}"] == 512
    assert values["vllm:prompt_tokens_cached_total"] == 512
    assert values["vllm:prompt_tokens_total"] == 600 + 760 + 600


def _stats_app(log_stats: bool):
    from engine.core.engine_core import EngineCore
    from engine.models.loader import load_tokenizer
    from engine.server.app import build_app
    from engine.server.async_engine import AsyncEngine
    from engine.server.metrics import ServerMetrics

    def make(config):
        core = EngineCore(config.engine)
        engine = AsyncEngine(core, load_tokenizer(core.model_config), ServerMetrics(MODEL), 16,
                             log_stats=log_stats, log_stats_interval_s=0.2)
        return build_app(engine, (MODEL,), core.model_config.path, max_request_body_bytes=1 << 20)

    return make


STATS_LINE = re.compile(
    r"Avg prompt throughput: (\d+\.\d) tokens/s, Avg generation throughput: (\d+\.\d) tokens/s, "
    r"Running: (\d+) reqs, Waiting: (\d+) reqs, GPU KV cache usage: (\d+\.\d)%, "
    r"Prefix cache hit rate: (\d+\.\d)%, External prefix cache hit rate: (\d+\.\d)%$")


def stats_lines(caplog, server: RunningServer) -> list[logging.LogRecord]:
    """The stats lines of `server` (its event loop's thread: the session's other servers log theirs too)."""
    return [r for r in caplog.records if r.name == "engine.server.async_engine" and r.thread == server.thread.ident
            and r.getMessage().startswith("Avg prompt throughput")]


def test_periodic_stats_line_like_vllms(tiny_model_dir, caplog):
    from tests.server.conftest import TINY_FLAGS

    caplog.set_level(logging.DEBUG, logger="engine.server.async_engine")
    argv = [tiny_model_dir, *TINY_FLAGS, "--kv-transfer-config", json.dumps(KV_CONFIG)]
    server = RunningServer(_stats_app(log_stats=True), argv)
    try:
        with server.client() as client:
            complete(client, PROMPT)
            deadline = time.monotonic() + 30
            while not any(r.levelno == logging.INFO and float(STATS_LINE.search(r.getMessage()).group(1)) > 0
                          for r in stats_lines(caplog, server)):
                assert time.monotonic() < deadline, [r.getMessage() for r in stats_lines(caplog, server)]
                time.sleep(0.05)
            # Idle again: the next lines (after one more at INFO showing the return to 0) are DEBUG.
            time.sleep(1.0)
    finally:
        server.stop()
    lines = stats_lines(caplog, server)
    assert all(STATS_LINE.search(r.getMessage()) for r in lines), [r.getMessage() for r in lines]
    busy = [r for r in lines if r.levelno == logging.INFO]
    # The 600 prompt tokens over the intervals that saw them; nothing running or waiting at the end.
    prompt_rates = [float(STATS_LINE.search(r.getMessage()).group(1)) for r in busy]
    assert sum(prompt_rates) > 0
    assert lines[-1].levelno == logging.DEBUG
    last = STATS_LINE.search(lines[-1].getMessage())
    assert (last.group(1), last.group(2), last.group(3), last.group(4)) == ("0.0", "0.0", "0", "0")
    # The first (and only) prompt missed both caches.
    assert last.group(6) == "0.0" and last.group(7) == "0.0"


def test_stats_line_off_like_disable_log_stats(tiny_model_dir, caplog):
    from tests.server.conftest import TINY_FLAGS

    caplog.set_level(logging.DEBUG, logger="engine.server.async_engine")
    server = RunningServer(_stats_app(log_stats=False), [tiny_model_dir, *TINY_FLAGS])
    try:
        with server.client() as client:
            complete(client, PROMPT)
            time.sleep(0.6)
    finally:
        server.stop()
    assert stats_lines(caplog, server) == []
