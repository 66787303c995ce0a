"""The embedded store (no kvstore_url, the default): prefixes come back from the engine's own memory
tier after its GPU prefix cache is emptied, one load after another, with the tokens of a cold run."""

from __future__ import annotations

from tests.connector.offload_helpers import MAX_TOKENS, generate, kv_config, make_llm, tokens

SHORT, LONG = tokens(31, 2 * 256), tokens(32, 5 * 256)


def test_loads_from_the_embedded_memory_tier(tiny_model, cold):
    llm = make_llm(tiny_model, kv_config())
    core = llm.engine.core
    for prompt in (SHORT, LONG):
        assert generate(llm, prompt + tokens(33, 20)) == cold(prompt + tokens(33, 20))
    assert core.connector.flush()

    # Short, long, short again: CPU loads reuse their staging buffers, and one grows in between.
    cases = [(SHORT, tokens(34, 30)), (LONG, tokens(35, 10)), (SHORT, tokens(36, 40))]
    for prefix, suffix in cases:
        core.kv.pool.reset_prefix_cache()
        before = core.stats().computed_tokens
        loaded = core.connector.metrics.snapshot().get("tierkv:offload_loaded_tokens", 0)
        assert generate(llm, prefix + suffix) == cold(prefix + suffix)
        assert core.stats().computed_tokens - before == len(suffix) + MAX_TOKENS - 1
        assert core.connector.metrics.snapshot()["tierkv:offload_loaded_tokens"] - loaded == len(prefix)
    assert "tierkv:offload_failed_load_tokens" not in core.connector.metrics.snapshot()
    core.close()
