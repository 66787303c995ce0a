"""Prefix sharing across engine processes: through one daemon, through Redis only, through S3 only.

Engine A serves a 2.3k-token prompt and saves its blocks; engine B, a separate process, serves the
same prefix with a new suffix and computes only the suffix, with exactly the tokens of a cold run.
"""

from __future__ import annotations

import pytest

from fixtures_services import make_bucket, obj_tier
from tests.connector.offload_helpers import (
    MAX_TOKENS, PREFIX, PREFIX_LEN, daemon_in_process, daemon_process, kv_config, run_engine_process, tokens,
)

pytestmark = pytest.mark.slow

SUFFIX_A, SUFFIX_B, SUFFIX_C = tokens(2, 40), tokens(3, 50), tokens(4, 30)
OTHER = tokens(5, PREFIX_LEN + 40)   # unrelated prompt that pushes the prefix out of A's GPU cache
# 16-token pages: one 2.3k-token request needs 148 of them, so a pool of 160 cannot keep two.
SMALL_POOL = 160


def decode_steps() -> int:
    return MAX_TOKENS - 1  # the first token comes from the prefill's last position


def test_two_engines_share_one_daemon(tiny_model, cold, tmp_path):
    with daemon_process(tmp_path=tmp_path) as (url, _):
        cfg = kv_config(kvstore_url=url)
        a = run_engine_process(tiny_model, cfg, [PREFIX + SUFFIX_A, OTHER, PREFIX + SUFFIX_C],
                               num_gpu_blocks=SMALL_POOL)
        b = run_engine_process(tiny_model, cfg, [PREFIX + SUFFIX_B])

    # A: cold, then an unrelated prompt evicts the prefix from its GPU cache, then the prefix comes
    # back from the store and only the new suffix is computed.
    assert a[0]["token_ids"] == cold(PREFIX + SUFFIX_A)
    assert a[0]["computed_tokens"] == PREFIX_LEN + len(SUFFIX_A) + decode_steps()
    assert a[0]["metrics"]["tierkv_offload_saved_blocks"] == PREFIX_LEN // 256
    assert a[2]["token_ids"] == cold(PREFIX + SUFFIX_C)
    assert a[2]["computed_tokens"] == len(SUFFIX_C) + decode_steps()
    reloaded = a[2]["metrics"]["tierkv_offload_loaded_tokens"] - a[1]["metrics"].get("tierkv_offload_loaded_tokens", 0)
    assert 0 < reloaded <= PREFIX_LEN

    # B: a separate process with a cold GPU cache loads the whole prefix.
    assert b[0]["token_ids"] == cold(PREFIX + SUFFIX_B)
    assert b[0]["computed_tokens"] == len(SUFFIX_B) + decode_steps()
    assert b[0]["metrics"]["tierkv_offload_loaded_tokens"] == PREFIX_LEN
    assert b[0]["metrics"]["tierkv_offload_hit_tokens{tier=memory}"] == PREFIX_LEN
    assert b[0]["metrics"]["tierkv_offload_loaded_bytes"] == PREFIX_LEN // 256 * 128 * 1024
    assert "tierkv_offload_failed_load_tokens" not in b[0]["metrics"]


def _share_through(tiny_model, cold, shared_tier: dict, tier_name: str) -> None:
    """A and B on two daemons that have only `shared_tier` in common (each has its own memory tier)."""
    tiers = [{"type": "memory", "bytes": "64MiB"}, shared_tier]
    with daemon_in_process(tiers) as (url_a, _), daemon_in_process(tiers) as (url_b, _):
        policy = {"name": "save_all", "tiers": ["memory", tier_name]}
        a = run_engine_process(tiny_model, kv_config(kvstore_url=url_a, policy=policy), [PREFIX + SUFFIX_A])
        b = run_engine_process(tiny_model, kv_config(kvstore_url=url_b, policy=policy), [PREFIX + SUFFIX_B])
    assert a[0]["token_ids"] == cold(PREFIX + SUFFIX_A)
    assert a[0]["metrics"]["tierkv_offload_saved_blocks"] == PREFIX_LEN // 256
    assert b[0]["token_ids"] == cold(PREFIX + SUFFIX_B)
    assert b[0]["computed_tokens"] == len(SUFFIX_B) + decode_steps()
    assert b[0]["metrics"][f"tierkv_offload_hit_tokens{{tier={tier_name}}}"] == PREFIX_LEN
    assert b[0]["metrics"]["tierkv_offload_loaded_tokens"] == PREFIX_LEN


def test_daemons_share_only_redis(tiny_model, cold, redis_url):
    _share_through(tiny_model, cold, {"type": "redis", "url": redis_url, "key_prefix": "share-test:"}, "redis")


def test_daemons_share_only_s3(tiny_model, cold, moto_endpoint):
    make_bucket(moto_endpoint, "tierkv-share")
    _share_through(tiny_model, cold, obj_tier(moto_endpoint, "tierkv-share"), "obj")
