"""Faults during a load: the daemon killed, Redis stopped, S3 unreachable.

Engine A saves a 2.3k-token prefix; engine B finds it and starts loading; while B's load is in
flight (held at a gate in the daemon's store) the fault happens. B must still answer every request
with the tokens of a cold run, recomputing what it could not load, and its connector metrics
must count the failures.
"""

from __future__ import annotations

import time

import pytest

from fixtures_services import make_bucket, obj_tier, start_moto, start_redis
from tests.connector.offload_helpers import (
    MAX_TOKENS, PREFIX, PREFIX_LEN, GatedStore, daemon_in_process, generate, kv_config, make_llm, tokens,
)
from engine.sampling.params import SamplingParams

SUFFIX_A, SUFFIX_B, LATER = tokens(12, 40), tokens(13, 50), tokens(14, 2 * 256 + 20)


@pytest.fixture(params=["daemon_killed", "redis_stopped", "s3_unreachable"])
def fault(request):
    """(tiers of the daemon's store, the function that breaks a tier; None: kill the daemon itself)."""
    if request.param == "daemon_killed":
        yield [{"type": "memory", "bytes": "64MiB"}], None
    elif request.param == "redis_stopped":
        url, stop, _ = start_redis()
        yield [{"type": "redis", "url": url}], stop
        stop()
    else:
        endpoint, stop = start_moto()
        make_bucket(endpoint, "tierkv-faults")
        yield [obj_tier(endpoint, "tierkv-faults", connect_timeout_s=0.2, max_attempts=1)], stop
        stop()


def serve_through_fault(llm, prompt: list[int], store: GatedStore, break_it) -> list[int]:
    """Step B until its load is in flight at the gate, break the store, let the load go on."""
    engine = llm.engine
    rid = engine.add_request(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    deadline = time.monotonic() + 30
    while not store.entered.is_set():
        assert time.monotonic() < deadline, "B never started loading"
        engine.step()
    assert rid in engine.core.scheduler.loading  # waiting for its KV, not computing
    break_it()
    store.release.set()
    finished = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished = out
    return list(finished.outputs[0].token_ids)


def test_fault_mid_load_recomputes(tiny_model, cold, fault):
    tiers, stop_tier = fault
    store = GatedStore(tiers)
    with daemon_in_process(tiers, store=store) as (url, handle):
        a = make_llm(tiny_model, kv_config(kvstore_url=url))
        store.release.set()  # A's own traffic passes the gate
        assert generate(a, PREFIX + SUFFIX_A) == cold(PREFIX + SUFFIX_A)
        assert a.engine.core.connector.flush()
        a.engine.core.close()

        store.entered.clear()
        store.release.clear()
        b = make_llm(tiny_model, kv_config(kvstore_url=url, load_timeout_s=2.0))
        break_it = stop_tier or (lambda: handle.stop(grace_s=0))
        assert serve_through_fault(b, PREFIX + SUFFIX_B, store, break_it) == cold(PREFIX + SUFFIX_B)
        core = b.engine.core
        assert core.stats().computed_tokens == PREFIX_LEN + len(SUFFIX_B) + MAX_TOKENS - 1
        metrics = core.connector.metrics.snapshot()
        assert metrics["tierkv_offload_hit_tokens{tier=" + store.tier_names[0] + "}"] == PREFIX_LEN
        assert metrics["tierkv_offload_failed_load_tokens"] == PREFIX_LEN
        assert "tierkv_offload_loaded_tokens" not in metrics
        if stop_tier is None:  # the daemon itself is gone: the Get RPC failed
            assert metrics["tierkv_offload_store_errors{op=get}"] >= 1

        # With the fault still there, a new request is served right, and its save is counted as failed.
        assert generate(b, LATER) == cold(LATER)
        assert core.connector.flush()
        metrics = core.connector.metrics.snapshot()
        assert metrics["tierkv_offload_store_errors{op=put}"] >= 1
        assert "tierkv_offload_saved_blocks" not in metrics
        if stop_tier is None:
            assert metrics["tierkv_offload_store_errors{op=lookup}"] == 1
        core.close()
