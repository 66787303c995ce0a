"""The embedded store (no kvstore_url, the default): prefixes come back from the engine's own memory
tier after its GPU prefix cache is emptied, one load after another, with the tokens of a cold run."""

from __future__ import annotations

from engine.sampling.params import SamplingParams
from tests.connector.offload_helpers import MAX_TOKENS, PREFIX, PREFIX_LEN, generate, kv_config, make_llm, tokens

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
        loaded = core.connector.metrics.snapshot().get("tierkv_offload_loaded_tokens", 0)
        assert generate(llm, prefix + suffix) == cold(prefix + suffix)
        assert core.stats().computed_tokens - before == len(suffix) + MAX_TOKENS - 1
        assert core.connector.metrics.snapshot()["tierkv_offload_loaded_tokens"] - loaded == len(prefix)
    assert "tierkv_offload_failed_load_tokens" not in core.connector.metrics.snapshot()
    core.close()


def test_a_request_waiting_for_pages_looks_up_once(tiny_model, cold):
    """160 pages of 16 tokens: while X (1500 tokens, 94+ pages) runs, B (the 2304-token prefix plus a
    suffix, 147 pages) cannot get its pages and is retried every step; it must cost one Lookup, and
    count its hit once, not once per step."""
    llm = make_llm(tiny_model, kv_config(), num_gpu_blocks=160)
    core = llm.engine.core
    assert generate(llm, PREFIX + tokens(41, 20)) == cold(PREFIX + tokens(41, 20))
    assert core.connector.flush()
    core.kv.pool.reset_prefix_cache()
    before = core.connector.metrics.snapshot()

    x, b = tokens(42, 1500), PREFIX + tokens(43, 30)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    llm.engine.add_request(x, params, request_id="x")
    llm.engine.add_request(b, params, request_id="b")
    outputs, steps_b_waited = {}, 0
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        steps_b_waited += any(r.request_id == "b" for r in core.scheduler.waiting)
    assert outputs == {"x": cold(x), "b": cold(b)}
    assert steps_b_waited >= 3

    after = core.connector.metrics.snapshot()

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert grew("tierkv_offload_lookups") == 2  # x's and b's
    assert grew("tierkv_offload_hit_tokens{tier=memory}") == PREFIX_LEN
    assert grew("tierkv_offload_loaded_tokens") == PREFIX_LEN
    core.close()


def test_a_prompt_ending_on_a_block_boundary_loads_every_block_and_computes_one_token(tiny_model, cold):
    prompt = tokens(37, 4 * 256)
    llm = make_llm(tiny_model, kv_config())
    core = llm.engine.core
    assert generate(llm, prompt) == cold(prompt)
    assert core.connector.flush()
    core.kv.pool.reset_prefix_cache()
    before = core.stats().computed_tokens
    loaded = core.connector.metrics.snapshot().get("tierkv_offload_loaded_tokens", 0)
    assert generate(llm, prompt) == cold(prompt)
    assert core.stats().computed_tokens - before == 1 + MAX_TOKENS - 1
    assert core.connector.metrics.snapshot()["tierkv_offload_loaded_tokens"] - loaded == len(prompt) - 1
    core.close()
