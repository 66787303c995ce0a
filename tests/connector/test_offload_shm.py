"""The connector on a same-host daemon's slab: engines map the daemon's slots and DMA blocks there.

Two engine processes share one daemon's slab (B loads every block of A's prefix from it, the tokens
of a cold run); a block corrupted in the daemon's slab is caught by the engine and recomputed; the
engine keeps serving through a daemon restart and re-attaches; the payload path takes over when the
slab cannot serve the engine, and `kvstore_shm: true` makes that a start-up error saying why.
"""

from __future__ import annotations

import time
import urllib.request

import pytest

from engine.connector.config import parse_kv_transfer_config
from engine.connector.daemon_slab_store import DaemonSlabStore
from engine.connector.store_backend import DaemonStore
from fixtures_services import free_port
from kvstore import slab_client
from kvstore.config import ConfigError
from kvstore.slab_client import SlabClient
from tests.connector.offload_helpers import (
    BLOCK, MAX_TOKENS, PREFIX, PREFIX_LEN, block_keys, daemon_in_process, daemon_process, generate, kv_config,
    make_llm, run_engine_process, tokens,
)

SUFFIX_A, SUFFIX_B = tokens(12, 40), tokens(13, 50)
BLOCK_BYTES = 128 * 1024   # one 256-token block of the tiny model
KEY = "kv_transfer_config.kv_connector_extra_config.kvstore_shm"
SHORT = tokens(21, 6 * BLOCK + 30)   # 6 blocks and a tail
BAD = 3                              # the block corrupted in the slab


pytestmark = pytest.mark.usefixtures("no_shm_leftovers")  # every test leaves /dev/shm as it found it


def slab_tiers(slot_bytes: int = BLOCK_BYTES) -> list[dict]:
    return [{"type": "memory", "bytes": "64MiB", "slot_bytes": slot_bytes}]


def _rpc_counts(metrics_port: int) -> dict[str, float]:
    """method -> successful calls, scraped from the daemon's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("kvstore_rpcs_total{") and 'code="OK"' in line:
            method = line.split('method="', 1)[1].split('"', 1)[0]
            counts[method] = float(line.rsplit(" ", 1)[1])
    return counts


def _wait(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _grew(llm, before: dict[str, float]) -> dict[str, float]:
    after = llm.engine.core.connector.metrics.snapshot()
    return {name: after.get(name, 0) - before.get(name, 0) for name in after}


@pytest.mark.slow
def test_two_engine_processes_share_the_daemons_slab(tiny_model, cold, tmp_path):
    port = free_port()
    with daemon_process({"tiers": slab_tiers(), "metrics_port": port}, tmp_path) as (url, _):
        cfg = kv_config(kvstore_url=url)
        a = run_engine_process(tiny_model, cfg, [PREFIX + SUFFIX_A])
        b = run_engine_process(tiny_model, cfg, [PREFIX + SUFFIX_B])
        counts = _rpc_counts(port)
    assert a[0]["token_ids"] == cold(PREFIX + SUFFIX_A)
    assert a[0]["metrics"]["tierkv_offload_saved_blocks"] == PREFIX_LEN // BLOCK
    assert b[0]["token_ids"] == cold(PREFIX + SUFFIX_B)
    assert b[0]["computed_tokens"] == len(SUFFIX_B) + MAX_TOKENS - 1
    # Every block of A's prefix, from the daemon's memory tier, out of the slots A wrote.
    assert b[0]["metrics"]["tierkv_offload_hit_tokens{tier=memory}"] == PREFIX_LEN
    assert b[0]["metrics"]["tierkv_offload_loaded_tokens"] == PREFIX_LEN
    assert b[0]["metrics"]["tierkv_offload_loaded_bytes"] == PREFIX_LEN // BLOCK * BLOCK_BYTES
    assert "tierkv_offload_failed_load_tokens" not in b[0]["metrics"]
    # No block byte crossed gRPC: slot numbers only.
    assert counts.get("Put", 0) == 0 and counts.get("Get", 0) == 0
    assert counts["AttachSlab"] == 2 and counts["CommitSlots"] >= 1 and counts["AcquireSlots"] >= 1


def test_a_block_corrupted_in_the_daemons_slab_is_recomputed(tiny_model, cold):
    with daemon_in_process(slab_tiers()) as (url, _):
        llm = make_llm(tiny_model, kv_config(kvstore_url=url))
        core = llm.engine.core
        assert isinstance(core.connector.store, DaemonSlabStore)
        assert generate(llm, SHORT) == cold(SHORT)
        assert core.connector.flush()
        with SlabClient(url) as probe:   # another mapping of the daemon's slab
            (block,) = probe.acquire(core.connector.namespace, [block_keys(llm, SHORT)[BAD]])
            probe.view(block.slot)[12345] ^= 0x40
            probe.release([block.slot])
        core.kv.pool.reset_prefix_cache()
        before, computed = core.connector.metrics.snapshot(), core.stats().computed_tokens
        assert generate(llm, SHORT) == cold(SHORT)
        grew = _grew(llm, before)
        assert grew["tierkv_offload_loaded_tokens"] == BAD * BLOCK
        assert grew["tierkv_offload_corrupt_blocks"] == 1
        assert core.stats().computed_tokens - computed == len(SHORT) - BAD * BLOCK + MAX_TOKENS - 1
        # The bad copy was deleted and the recomputed blocks saved again: the next hit loads them all.
        assert core.connector.flush()
        core.kv.pool.reset_prefix_cache()
        before = core.connector.metrics.snapshot()
        assert generate(llm, SHORT) == cold(SHORT)
        assert _grew(llm, before)["tierkv_offload_loaded_tokens"] == 6 * BLOCK
        core.close()


def test_the_engine_serves_through_a_daemon_restart_and_re_attaches(tiny_model, cold, tmp_path, monkeypatch):
    monkeypatch.setattr(slab_client, "REATTACH_S", 0.2)
    port = free_port()
    config = {"tiers": slab_tiers()}
    with daemon_process(config, tmp_path, port=port) as (url, daemon):
        llm = make_llm(tiny_model, kv_config(kvstore_url=url))
        core = llm.engine.core
        connector = core.connector
        assert generate(llm, SHORT) == cold(SHORT)
        assert connector.flush()
        daemon.terminate()
        daemon.wait(timeout=20)
        _wait(lambda: not connector.store.slab.attached, "the engine sees its session end")
        core.kv.pool.reset_prefix_cache()
        assert generate(llm, SHORT) == cold(SHORT)     # nothing to load from: recomputed
        assert connector.flush()
    with daemon_process(config, tmp_path, port=port):
        _wait(lambda: connector.store.slab.attached, "the engine re-attaches to the restarted daemon")
        _wait(lambda: connector._lookup_cooldown.ready(), "the lookup backoff runs out")
        core.kv.pool.reset_prefix_cache()
        assert generate(llm, SHORT) == cold(SHORT)     # a fresh daemon: cold, and saved into its slab
        assert connector.flush()
        core.kv.pool.reset_prefix_cache()
        before = connector.metrics.snapshot()
        assert generate(llm, SHORT) == cold(SHORT)
        assert _grew(llm, before)["tierkv_offload_loaded_tokens"] == 6 * BLOCK
        core.close()


def test_a_payload_engine_and_a_slab_engine_share_blocks(tiny_model, cold):
    with daemon_in_process(slab_tiers()) as (url, _):
        remote = make_llm(tiny_model, kv_config(kvstore_url=url, kvstore_shm=False))
        assert isinstance(remote.engine.core.connector.store, DaemonStore)
        assert generate(remote, SHORT) == cold(SHORT)
        assert remote.engine.core.connector.flush()
        remote.engine.core.close()
        local = make_llm(tiny_model, kv_config(kvstore_url=url))
        before = local.engine.core.connector.metrics.snapshot()
        assert generate(local, SHORT) == cold(SHORT)
        assert _grew(local, before)["tierkv_offload_loaded_tokens"] == 6 * BLOCK
        local.engine.core.close()


@pytest.mark.parametrize("tiers, breaks, reason", [
    ([{"type": "memory", "bytes": "16MiB"}], None,
     "AttachSlab: FAILED_PRECONDITION: this daemon has no slab (its first tier is not a memory tier with slot_bytes)"),
    (slab_tiers(2 * BLOCK_BYTES), None,
     f"its slot_bytes is {2 * BLOCK_BYTES}, this engine's offloaded blocks are {BLOCK_BYTES} bytes"),
    (slab_tiers(), "unlink", "the daemon is not on this host, or does not share its /dev/shm"),
])
def test_a_slab_that_cannot_serve_the_engine_means_payloads_or_with_true_a_startup_error(tiny_model, tiers, breaks,
                                                                                            reason):
    with daemon_in_process(tiers) as (url, handle):
        if breaks == "unlink":   # what an engine on another host, or in another /dev/shm, sees
            handle.store.tier("memory").segment.path.unlink()
        llm = make_llm(tiny_model, kv_config(kvstore_url=url))
        assert isinstance(llm.engine.core.connector.store, DaemonStore)
        llm.engine.core.close()
        with pytest.raises(ConfigError) as info:
            make_llm(tiny_model, kv_config(kvstore_url=url, kvstore_shm=True))
    message = str(info.value)
    assert message.startswith(f"{KEY}: the daemon's slab cannot be used (") and reason in message
    assert message.endswith('set it to "auto" or false to use the gRPC payload path')


@pytest.mark.parametrize("value, message", [
    ("yes", f'{KEY}: Value error, expected "auto", true or false'),
    (1, f'{KEY}: Value error, expected "auto", true or false'),
])
def test_bad_kvstore_shm_values_name_the_key(value, message):
    with pytest.raises(ConfigError) as info:
        parse_kv_transfer_config(kv_config(kvstore_url="grpc://127.0.0.1:1", kvstore_shm=value))
    assert str(info.value) == message


def test_kvstore_shm_true_needs_a_daemon():
    with pytest.raises(ConfigError, match="kvstore_shm: true needs a kvstore_url"):
        parse_kv_transfer_config(kv_config(kvstore_shm=True))
