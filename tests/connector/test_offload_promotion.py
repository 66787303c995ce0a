"""A hit from Redis or S3 is promoted into the memory tier: the next identical request on this
host loads from memory, with the tokens of a cold run."""

from __future__ import annotations

import pytest

from fixtures_services import obj_tier
from tests.connector.offload_helpers import BLOCK, generate, kv_config, make_llm, tokens


@pytest.mark.parametrize("tier", ["redis", "obj"])
def test_the_second_hit_comes_from_memory(tiny_model, cold, redis_url, s3_bucket, tier):
    endpoint, bucket = s3_bucket
    lower = ({"type": "redis", "url": redis_url, "key_prefix": f"promotion-{bucket}:"} if tier == "redis"
             else obj_tier(endpoint, bucket))
    llm = make_llm(tiny_model, kv_config(cpu_bytes_to_use="64MiB", secondary_tiers=[lower],
                                         policy={"name": "save_all", "tiers": [tier]}))
    core = llm.engine.core
    metrics = core.connector.metrics
    prompt = tokens(81, 4 * BLOCK + 30)
    assert generate(llm, prompt) == cold(prompt)
    assert core.connector.flush()
    for expected in (tier, "memory"):
        core.kv.pool.reset_prefix_cache()
        before = metrics.snapshot()
        assert generate(llm, prompt) == cold(prompt)
        after = metrics.snapshot()
        name = f"tierkv_offload_hit_tokens{{tier={expected}}}"
        assert after.get(name, 0) - before.get(name, 0) == 4 * BLOCK
        assert after["tierkv_offload_loaded_tokens"] - before.get("tierkv_offload_loaded_tokens", 0) == 4 * BLOCK
    core.close()
