"""The per-request policy: built-ins, roles, a user's own class, write-through tiers."""

from __future__ import annotations

import pytest

from fixtures_services import obj_tier
from engine.connector.policy import RequestInfo
from engine.sampling.params import SamplingParams
from kvstore.config import ConfigError
from tests.connector.offload_helpers import (
    MAX_TOKENS, PREFIX, PREFIX_LEN, blocks_held, daemon_in_process, generate, kv_config, make_llm,
    stored_prefix_blocks, tokens,
)

SHORT, LONG = tokens(21, 2 * 256 + 88), tokens(22, 4 * 256 + 26)   # 2 and 4 full blocks
CFG_KEY = "kv_transfer_config.kv_connector_extra_config."


def test_min_prompt_tokens_leaves_no_trace_of_short_prompts(tiny_model, cold):
    llm = make_llm(tiny_model, kv_config(policy={"name": "min_prompt_tokens", "min_tokens": 1000}))
    assert generate(llm, SHORT) == cold(SHORT)
    assert llm.engine.core.connector.flush()
    assert blocks_held(llm) == {}
    assert stored_prefix_blocks(llm, SHORT) == 0
    assert "tierkv_offload_saved_blocks" not in llm.engine.core.connector.metrics.snapshot()

    assert generate(llm, LONG) == cold(LONG)
    assert llm.engine.core.connector.flush()
    assert blocks_held(llm) == {"memory": 4}
    assert stored_prefix_blocks(llm, LONG) == 4
    assert stored_prefix_blocks(llm, SHORT) == 0
    llm.engine.core.close()


def test_producer_never_loads_and_consumer_never_saves(tiny_model, cold):
    with daemon_in_process([{"type": "memory", "bytes": "64MiB"}]) as (url, handle):
        writer = make_llm(tiny_model, kv_config(kvstore_url=url))
        generate(writer, PREFIX + tokens(23, 40))
        assert writer.engine.core.connector.flush()
        assert stored_prefix_blocks(writer, PREFIX) == PREFIX_LEN // 256
        writer.engine.core.close()

        producer = make_llm(tiny_model, kv_config("kv_producer", kvstore_url=url))
        prompt = PREFIX + tokens(24, 50)
        assert generate(producer, prompt) == cold(prompt)
        assert producer.engine.core.stats().computed_tokens == len(prompt) + MAX_TOKENS - 1
        assert generate(producer, LONG) == cold(LONG)
        assert producer.engine.core.connector.flush()
        metrics = producer.engine.core.connector.metrics.snapshot()
        assert "tierkv_offload_loaded_tokens" not in metrics
        assert metrics["tierkv_offload_saved_blocks"] == 4  # LONG's blocks only: the prefix was there
        assert stored_prefix_blocks(producer, LONG) == 4
        producer.engine.core.close()

        consumer = make_llm(tiny_model, kv_config("kv_consumer", kvstore_url=url))
        before = handle.store.stats()
        prompt = PREFIX + tokens(25, 30)
        assert generate(consumer, prompt) == cold(prompt)
        assert consumer.engine.core.stats().computed_tokens == 30 + MAX_TOKENS - 1
        fresh = tokens(26, 3 * 256 + 5)
        assert generate(consumer, fresh) == cold(fresh)
        assert consumer.engine.core.connector.flush()
        metrics = consumer.engine.core.connector.metrics.snapshot()
        assert metrics["tierkv_offload_loaded_tokens"] == PREFIX_LEN
        assert "tierkv_offload_saved_blocks" not in metrics
        assert stored_prefix_blocks(consumer, fresh) == 0
        assert handle.store.stats() == before
        consumer.engine.core.close()


def test_user_policy_class_with_arguments(tiny_model, cold):
    policy = {"class": "tests.connector.user_policy:UserAllowList", "users": ["alice"], "ttl_s": 600}
    llm = make_llm(tiny_model, kv_config(policy=policy))
    engine = llm.engine
    alice, bob = tokens(27, 2 * 256 + 10), tokens(28, 2 * 256 + 10)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    engine.add_request(alice, params, request_id="a", priority=3, metadata={"user": "alice"})
    engine.add_request(bob, params, request_id="b", metadata={"user": "bob"})
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
    assert outputs == {"a": cold(alice), "b": cold(bob)}
    assert llm.engine.core.connector.flush()
    assert stored_prefix_blocks(llm, alice) == 2
    assert stored_prefix_blocks(llm, bob) == 0
    seen = llm.engine.core.connector.policy.seen
    assert seen[0] == RequestInfo(request_id="a", prompt_len=len(alice), gpu_hit_tokens=0, priority=3,
                                  model=llm.engine.model_config.name, metadata={"user": "alice"})
    assert [info.request_id for info in seen] == ["a", "b"]
    llm.engine.core.close()


@pytest.mark.parametrize("policy, message", [
    ({"class": "tests.connector.no_such_module:Policy"}, "policy.class: cannot import module"),
    ({"class": "tests.connector.user_policy:Missing"}, "policy.class: module 'tests.connector.user_policy' has no 'Missing'"),
    ({"class": "tests.connector.user_policy:NoHook"}, "policy.class: policy class .* has no on_new_request"),
    ({"class": "tests.connector.user_policy:UserAllowList"}, "policy: bad arguments for .*users"),
    ({"class": "tests.connector.user_policy:UserAllowList", "users": []},
     "policy.class: .* failed to start: ValueError: users: expected at least one user name"),
    ({"class": "no_colon_here"}, "policy.class: expected 'package.module:Name'"),
    ({"name": "save_everything"}, "policy.name: unknown policy 'save_everything'"),
    ({"name": "min_prompt_tokens", "min_tokens": -1}, "policy.min_tokens: expected an integer >= 0"),
    ({"name": "save_all", "tiers": ["memory", "disk"]}, r"policy.tiers: unknown tier\(s\) \['disk'\]"),
    ({"name": "save_all", "class": "a.b:C"}, "policy: .*exactly one of"),
])
def test_bad_policy_is_a_startup_error_naming_the_key(tiny_model, policy, message):
    with pytest.raises(ConfigError, match=CFG_KEY.replace(".", r"\.") + message):
        make_llm(tiny_model, kv_config(policy=policy))


def test_tier_by_length_writes_through_the_named_tiers(tiny_model, cold, redis_url, s3_bucket):
    endpoint, bucket = s3_bucket
    rules = [{"min_tokens": 0, "tiers": ["memory"]}, {"min_tokens": 1000, "tiers": ["memory", "redis", "obj"]}]
    llm = make_llm(tiny_model, kv_config(
        secondary_tiers=[{"type": "redis", "url": redis_url, "key_prefix": "tier-by-length:"}, obj_tier(endpoint, bucket)],
        policy={"name": "tier_by_length", "rules": rules}))
    assert generate(llm, SHORT) == cold(SHORT)
    assert llm.engine.core.connector.flush()
    assert blocks_held(llm) == {"memory": 2}
    assert generate(llm, LONG) == cold(LONG)
    assert llm.engine.core.connector.flush()
    assert blocks_held(llm) == {"memory": 6, "redis": 4, "obj": 4}
    llm.engine.core.close()
