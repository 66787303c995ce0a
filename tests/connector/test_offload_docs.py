"""The offloading docs stay true to the code: every config key and metric is documented, the user
policy class in docs/policies.md is the one the tests run, verbatim, and the three-tier and
two-replica examples do what they say."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
import yaml

from engine.connector.config import KVTransferConfig, OffloadConfig
from engine.connector.metrics import ConnectorMetrics
from fixtures_services import obj_tier
from tests.connector.offload_helpers import (
    BLOCK, MAX_TOKENS, REPO, daemon_process, generate, make_llm, tokens,
)
from tests.server.conftest import free_port
from tests.server.test_serve_process import ServeProcess

DOCS = REPO / "docs"


def test_every_config_key_and_metric_is_in_the_offloading_doc():
    doc = (DOCS / "offloading.md").read_text()
    table_keys = set(re.findall(r"^\| `(\w+)` \|", doc, flags=re.M))
    assert set(OffloadConfig.model_fields) | set(KVTransferConfig.model_fields) <= table_keys
    metrics = {family.name for family in ConnectorMetrics("m").registry.collect()}
    documented = {re.sub(r"_total$", "", name) for name in re.findall(r"`(tierkv_offload_\w+?)(?:\{\w+\})?`", doc)}
    assert metrics == documented


def test_worked_example_is_the_tested_policy_class():
    doc = (DOCS / "policies.md").read_text()
    listings = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    example = next(code for code in listings if "class UserAllowList" in code)
    assert example in (REPO / "tests" / "connector" / "user_policy.py").read_text()


def test_the_documented_three_tier_example_shares_prefixes_between_replicas(tiny_model, cold, redis_url, s3_bucket):
    """The README-style example in docs/offloading.md, pointed at this test's Redis and S3: a second
    replica (its own memory tier) loads the first one's prompt from the shared tiers."""
    doc = (DOCS / "offloading.md").read_text()
    example = re.search(r"# Memory, then Redis, then S3.*?--kv-transfer-config '(\{.*?\})'\n", doc, flags=re.S)
    cfg = json.loads(example.group(1))
    extra = cfg["kv_connector_extra_config"]
    endpoint, bucket = s3_bucket
    extra.update(cpu_bytes_to_use="64MiB", load_cost_model=False)
    extra["secondary_tiers"] = [{"type": "redis", "url": redis_url, "key_prefix": "docs-example:"},
                                obj_tier(endpoint, bucket)]
    prompt = tokens(61, 3 * BLOCK + 40)
    first = make_llm(tiny_model, cfg)
    assert generate(first, prompt) == cold(prompt)
    assert first.engine.core.connector.flush()
    first.engine.core.close()
    second = make_llm(tiny_model, cfg)
    loaded_before = second.engine.core.connector.metrics.snapshot().get("tierkv_offload_loaded_tokens", 0)
    assert generate(second, prompt) == cold(prompt)
    snapshot = second.engine.core.connector.metrics.snapshot()
    assert snapshot["tierkv_offload_loaded_tokens"] - loaded_before == 3 * BLOCK
    assert snapshot["tierkv_offload_hit_tokens{tier=redis}"] == 3 * BLOCK
    second.engine.core.close()


def two_replica_example() -> tuple[str, dict]:
    """(the bash block, its CFG as a dict) of "Example: two replicas sharing one daemon"."""
    doc = (DOCS / "offloading.md").read_text()
    section = doc.split("## Example: two replicas sharing one daemon", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return block, json.loads(re.search(r"^CFG='(.*?)'$", block, flags=re.M | re.S).group(1))


def example_daemon_config(redis_url: str, s3_bucket: tuple[str, str], port: int) -> dict:
    """deploy/kvstore.yaml, the file the example's daemon reads, pointed at this test's Redis and S3
    and a free port; a 64 MiB memory tier and no metrics port (both fixed on a test machine)."""
    cfg = yaml.safe_load((REPO / "deploy" / "kvstore.yaml").read_text())
    cfg.pop("metrics_port")
    memory, redis, obj = cfg["tiers"]
    assert [memory["type"], redis["type"], obj["type"]] == ["memory", "redis", "obj"]
    memory["bytes"] = "64MiB"
    redis["url"] = redis_url
    endpoint, bucket = s3_bucket
    cfg["tiers"][2] = obj_tier(endpoint, bucket, key_prefix=obj["key_prefix"])
    return cfg


def complete(server: ServeProcess, prompt: list[int]) -> str:
    """The text of a greedy /v1/completions answer to the token ids `prompt`."""
    response = httpx.post(f"{server.base_url}/v1/completions", timeout=120,
                          json={"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def detokenize(server: ServeProcess, token_ids: list[int]) -> str:
    response = httpx.post(f"{server.base_url}/detokenize", json={"tokens": token_ids})
    assert response.status_code == 200, response.text
    return response.json()["prompt"]


def wait_for_metric(server: ServeProcess, line_start: str, value: float, timeout_s: float = 30) -> None:
    """Wait until /metrics has a sample starting with `line_start` at `value` (saves finish after the
    answer does)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = [line for line in httpx.get(f"{server.base_url}/metrics").text.splitlines()
                   if line.startswith(line_start)]
        if any(float(line.rsplit(" ", 1)[1]) == value for line in samples):
            return
        assert time.monotonic() < deadline, f"{line_start} never reached {value}: {samples}"
        time.sleep(0.1)


@pytest.mark.slow
def test_two_replica_example_loads_from_redis_after_the_daemon_restarts(tiny_model, cold, redis_url, s3_bucket,
                                                                        tmp_path):
    """The example as the doc runs it: the daemon on deploy/kvstore.yaml, two `tierkv serve` replicas
    with its CFG, a 2,350-token document with a question to the first, the daemon restarted (its
    memory tier empty), the document with a new question to the second. The second loads the
    document's 9 whole blocks from Redis, answers as a cold run does, and its /metrics, filtered by
    the doc's grep, is the doc's listing."""
    block, cfg = two_replica_example()
    assert "kvstore serve --config deploy/kvstore.yaml" in block
    port = free_port()
    extra = cfg["kv_connector_extra_config"]
    extra["kvstore_url"] = f"grpc://127.0.0.1:{port}"
    # On two shared cores the tiny model's prefill and Redis run at similar, noisy rates: the cost
    # model would make the load a coin toss, so the test always loads (the doc says what it changes).
    extra["load_cost_model"] = False
    # The served name the doc's replicas get from their model directory, Qwen3-0.6B/.
    flags = [tiny_model, "--served-model-name", "Qwen3-0.6B", "--dtype", "float32", "--max-model-len", "4096",
             "--kv-transfer-config", json.dumps(cfg)]
    config = example_daemon_config(redis_url, s3_bucket, port)
    document, question_a, question_b = tokens(71, 2350), tokens(72, 30), tokens(73, 30)
    replicas = []
    try:
        with daemon_process(config, tmp_path=tmp_path, port=port):
            replicas += [ServeProcess(*flags), ServeProcess(*flags)]
            first, second = replicas
            assert complete(first, document + question_a) == detokenize(first, cold(document + question_a))
            wait_for_metric(first, "tierkv_offload_saved_blocks_total", 9)
        with daemon_process(config, tmp_path=tmp_path, port=port):   # restarted: its memory tier is empty
            assert complete(second, document + question_b) == detokenize(second, cold(document + question_b))
            metrics = httpx.get(f"{second.base_url}/metrics").text
    finally:
        for replica in replicas:
            replica.kill()
    section = (DOCS / "offloading.md").read_text().split("## Example: two replicas sharing one daemon", 1)[1]
    pattern, shown = re.search(r"grep -E '(.*?)'\n```\n\nprints\n\n```\n(.*?)```", section, flags=re.S).groups()
    assert shown.splitlines() == [
        'tierkv_offload_hit_tokens_total{model_name="Qwen3-0.6B",tier="memory"} 0.0',
        'tierkv_offload_hit_tokens_total{model_name="Qwen3-0.6B",tier="redis"} 2304.0',
        'tierkv_offload_hit_tokens_total{model_name="Qwen3-0.6B",tier="obj"} 0.0',
        'tierkv_offload_loaded_tokens_total{model_name="Qwen3-0.6B"} 2304.0',
    ]
    assert [line for line in metrics.splitlines() if re.search(pattern, line)] == shown.splitlines()
