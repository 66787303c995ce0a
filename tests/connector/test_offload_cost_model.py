"""Load or recompute: a tier slower than the engine's prefill is not loaded from, and a hit never
makes a request slower than having no store."""

from __future__ import annotations

import time

from engine.connector import cost_model
from engine.connector.cost_model import CostModel
from tests.connector.offload_helpers import BLOCK, MAX_TOKENS, generate, kv_config, make_llm, tokens
from tests.connector.slow_proxy import SlowProxy

MIB = 1 << 20


def model(prefill_tokens_per_s: float | None, **tier_bytes_per_s: float) -> CostModel:
    cost = CostModel(block_size=256, block_bytes=MIB)
    for tier, rate in tier_bytes_per_s.items():
        cost.observe_load(tier, 10 * MIB, 10 * MIB / rate)
    if prefill_tokens_per_s is not None:
        cost.observe_prefill(2560, 2560 / prefill_tokens_per_s)
    return cost


def test_blocks_load_while_moving_them_is_faster_than_computing_them():
    # 256 tokens at 25,600 tokens/s: 10 ms. A 1 MiB block: 1 ms from memory, 100 ms from s3.
    cost = model(25_600, memory=1000 * MIB, s3=10 * MIB)
    assert cost.blocks_to_load(["memory"] * 4, 0, 0, 4 * 256 + 10) == 4
    assert cost.blocks_to_load(["s3"] * 4, 0, 0, 4 * 256 + 10) == 0
    # A fast tier above a slow one: the fast prefix loads, the rest is computed.
    assert cost.blocks_to_load(["memory", "memory", "s3", "s3"], 0, 0, 4 * 256 + 10) == 2
    # Blocks already on the GPU are not counted again.
    assert cost.blocks_to_load(["memory"] * 4, 1, 256, 4 * 256 + 10) == 3


def test_tiers_slower_than_prefill_are_not_looked_up_until_their_rate_is_stale(monkeypatch):
    cost = model(25_600, memory=1000 * MIB, s3=10 * MIB)
    assert cost.slow_tiers() == {"s3"}
    assert model(None, s3=MIB).slow_tiers() == set()       # no prefill rate yet: every tier is asked
    later = time.monotonic() + cost_model.RATE_TTL_S + 1
    monkeypatch.setattr(cost_model.time, "monotonic", lambda: later)
    assert cost.slow_tiers() == set() and cost.estimates().tier_bytes_per_s == {}


def test_unmeasured_rates_load_everything():
    assert model(None, s3=MIB).blocks_to_load(["s3"] * 3, 0, 0, 800) == 3
    assert model(25_600).blocks_to_load(["never-seen"] * 3, 0, 0, 800) == 3


def test_a_slow_tier_is_recomputed_instead_of_loaded(tiny_model, cold, redis_url):
    """Redis behind a link that delivers ~0.4 MB/s (far below prefill, even on two busy cores: at
    ~1 MB/s a loaded machine once prefilled slower than that): the first hit loads (its rate is
    unknown), and measures it; later requests do not even ask Redis (its lookup would only add
    latency) and recompute, with the tokens of a cold run."""
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    proxy = SlowProxy((host, int(port)), delay_s=0.04)
    try:
        # One connection: the proxy slows each connection alone, and the tier would spread a batch over several.
        tier = {"type": "redis", "url": f"redis://127.0.0.1:{proxy.port}/0", "key_prefix": "cost-model:",
                "batch_connections": 1}
        llm = make_llm(tiny_model, kv_config(cpu_bytes_to_use=0, secondary_tiers=[tier], load_cost_model=True))
        core = llm.engine.core
        metrics = core.connector.metrics
        for seed in (51, 52):
            prompt = tokens(seed, 6 * BLOCK + 20)
            assert generate(llm, prompt) == cold(prompt)
            assert core.connector.flush(60)
            core.kv.pool.reset_prefix_cache()
            before, computed = metrics.snapshot(), core.stats().computed_tokens
            assert generate(llm, prompt) == cold(prompt)
            after = metrics.snapshot()
            loaded = after.get("tierkv_offload_loaded_tokens", 0) - before.get("tierkv_offload_loaded_tokens", 0)
            unasked = (after.get("tierkv_offload_unasked_lookups{tier=redis}", 0)
                       - before.get("tierkv_offload_unasked_lookups{tier=redis}", 0))
            if seed == 51:
                assert loaded == 6 * BLOCK and unasked == 0
            else:
                assert loaded == 0 and unasked == 1
                assert core.stats().computed_tokens - computed == len(prompt) + MAX_TOKENS - 1
        rates = core.connector.cost.estimates()
        assert rates.tier_bytes_per_s["redis"] < 5 * MIB
        assert rates.prefill_tokens_per_s * 512 > rates.tier_bytes_per_s["redis"]   # 512 bytes of KV per token
        core.close()
    finally:
        proxy.close()
