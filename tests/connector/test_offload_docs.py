"""The offloading docs stay true to the code: every config key and metric is documented, the user
policy class in docs/policies.md is the one the tests run, verbatim, and the three-tier example
does what it says."""

from __future__ import annotations

import json
import re

from engine.connector.config import KVTransferConfig, OffloadConfig
from engine.connector.metrics import ConnectorMetrics
from fixtures_services import obj_tier
from tests.connector.offload_helpers import BLOCK, REPO, generate, make_llm, tokens

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
