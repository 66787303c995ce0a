"""A block corrupted anywhere it rests (the slab, Redis, S3) is detected and recomputed: the answer
equals a cold run, the load stops at the bad block, and the bad copy is deleted."""

from __future__ import annotations

import redis

from engine.core.request import EngineRequest, Request
from engine.sampling.params import SamplingParams
from fixtures_services import obj_tier, s3_client
from tests.connector.offload_helpers import BLOCK, MAX_TOKENS, generate, kv_config, make_llm, tokens

PREFIX = tokens(71, 6 * BLOCK)
SUFFIX = tokens(72, 30)
BAD = 3   # the corrupted block: blocks 0-2 load, 3 onwards are recomputed


def hit_after_corruption(llm, cold, corrupt) -> dict[str, float]:
    core = llm.engine.core
    assert generate(llm, PREFIX + SUFFIX) == cold(PREFIX + SUFFIX)
    assert core.connector.flush()
    corrupt(core.connector)
    core.kv.pool.reset_prefix_cache()
    before = core.connector.metrics.snapshot()
    computed = core.stats().computed_tokens
    assert generate(llm, PREFIX + SUFFIX) == cold(PREFIX + SUFFIX)
    after = core.connector.metrics.snapshot()
    return {name: after.get(name, 0) - before.get(name, 0) for name in after} | {
        "computed": core.stats().computed_tokens - computed}


def test_a_block_corrupted_in_the_slab_is_recomputed(tiny_model, cold):
    llm = make_llm(tiny_model, kv_config())

    def flip_a_byte(connector) -> None:
        store = connector.store
        key = connector.block_key(_request(llm, PREFIX), BAD)
        (block,) = store.slab.acquire(connector.namespace, [key])
        store.slab_rows[block.slot, 12345] ^= 0x40
        store.slab.release([block.slot])

    grew = hit_after_corruption(llm, cold, flip_a_byte)
    assert grew["tierkv_offload_loaded_tokens"] == BAD * BLOCK
    assert grew["tierkv_offload_corrupt_blocks"] == 1
    assert grew["computed"] == len(PREFIX) - BAD * BLOCK + len(SUFFIX) + MAX_TOKENS - 1
    # The bad copy was deleted, and the recomputed blocks were saved again: the next hit loads them all.
    assert llm.engine.core.connector.flush()
    llm.engine.core.kv.pool.reset_prefix_cache()
    loaded = llm.engine.core.connector.metrics.snapshot()["tierkv_offload_loaded_tokens"]
    assert generate(llm, PREFIX + SUFFIX) == cold(PREFIX + SUFFIX)
    assert llm.engine.core.connector.metrics.snapshot()["tierkv_offload_loaded_tokens"] - loaded == len(PREFIX)
    llm.engine.core.close()


def test_blocks_corrupted_in_redis_and_s3_are_recomputed(tiny_model, cold, redis_url, s3_bucket):
    endpoint, bucket = s3_bucket
    tiers = {"redis": {"type": "redis", "url": redis_url, "key_prefix": "integrity:"}, "obj": obj_tier(endpoint, bucket)}
    for tier in ("redis", "obj"):
        llm = make_llm(tiny_model, kv_config(cpu_bytes_to_use=0, secondary_tiers=[tiers[tier]]))

        def corrupt_stored_value(connector, tier=tier) -> None:
            if tier == "redis":
                client = redis.Redis.from_url(redis_url)
                names = sorted(client.keys("integrity:*"))
                assert len(names) >= BAD + 1
                for name in names:   # flip a payload byte of every stored block: each one is now bad
                    value = bytearray(client.get(name))
                    value[-100] ^= 0x01
                    client.set(name, bytes(value))
            else:
                s3 = s3_client(endpoint)
                for item in s3.list_objects_v2(Bucket=bucket)["Contents"]:
                    value = bytearray(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
                    value[-100] ^= 0x01
                    s3.put_object(Bucket=bucket, Key=item["Key"], Body=bytes(value))

        grew = hit_after_corruption(llm, cold, corrupt_stored_value)
        assert grew.get("tierkv_offload_loaded_tokens", 0) == 0
        assert grew["computed"] == len(PREFIX) + len(SUFFIX) + MAX_TOKENS - 1
        llm.engine.core.close()


def _request(llm, prompt: list[int]) -> Request:
    """A request for `prompt`, whose block keys are the ones the connector stores it under."""
    core = llm.engine.core
    req = EngineRequest("probe", list(prompt), SamplingParams(max_tokens=1))
    return Request(req, seed=0, max_tokens=1, block_size=core.config.block_size, hash_seed=core.namespace.digest())
