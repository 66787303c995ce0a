"""The connector's same-host fast path: two engine processes share one daemon through shared memory,
the payload path takes over when the daemon refuses it, and nothing is left in /dev/shm."""

from __future__ import annotations

import urllib.request

import pytest

from fixtures_services import free_port
from kvstore.config import ConfigError
from tests.connector.offload_helpers import (
    MAX_TOKENS, PREFIX, PREFIX_LEN, daemon_process, kv_config, make_llm, run_engine_process, tokens,
)
from engine.connector.config import parse_kv_transfer_config

SUFFIX_A, SUFFIX_B = tokens(12, 40), tokens(13, 50)
BLOCK_BYTES = 128 * 1024   # one 256-token block of the tiny model


pytestmark = pytest.mark.usefixtures("no_shm_leftovers")  # every test leaves /dev/shm as it found it


def _rpc_counts(metrics_port: int) -> dict[str, float]:
    """method -> successful calls, scraped from the daemon's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("kvstore_rpcs_total{") and 'code="OK"' in line:
            method = line.split('method="', 1)[1].split('"', 1)[0]
            counts[method] = float(line.rsplit(" ", 1)[1])
    return counts


def _share(tiny_model, cold, tmp_path, daemon_config: dict, shm) -> dict[str, float]:
    """A then B (separate processes) through one daemon process; B computes only its suffix."""
    port = free_port()
    with daemon_process({**daemon_config, "metrics_port": port}, tmp_path) as (url, _):
        cfg = kv_config(kvstore_url=url, kvstore_shm=shm)
        a = run_engine_process(tiny_model, cfg, [PREFIX + SUFFIX_A])
        b = run_engine_process(tiny_model, cfg, [PREFIX + SUFFIX_B])
        counts = _rpc_counts(port)
    assert a[0]["token_ids"] == cold(PREFIX + SUFFIX_A)
    assert a[0]["metrics"]["tierkv:offload_saved_blocks"] == PREFIX_LEN // 256
    assert b[0]["token_ids"] == cold(PREFIX + SUFFIX_B)
    assert b[0]["computed_tokens"] == len(SUFFIX_B) + MAX_TOKENS - 1
    assert b[0]["metrics"]["tierkv:offload_loaded_tokens"] == PREFIX_LEN
    assert b[0]["metrics"]["tierkv:offload_loaded_bytes"] == PREFIX_LEN // 256 * BLOCK_BYTES
    assert "tierkv:offload_failed_load_tokens" not in b[0]["metrics"]
    return counts


@pytest.mark.slow
def test_two_engines_share_one_daemon_through_shared_memory(tiny_model, cold, tmp_path):
    counts = _share(tiny_model, cold, tmp_path, {}, "auto")
    # Every block went by handle: no Put or Get carried a payload.
    assert counts.get("PutShm", 0) >= 1 and counts.get("GetShm", 0) == 1
    assert counts.get("Put", 0) == 0 and counts.get("Get", 0) == 0
    assert counts.get("AttachShm", 0) == 2   # one session per engine, ended when each exited


@pytest.mark.slow
def test_daemon_refusing_shm_falls_back_to_the_payload_path(tiny_model, cold, tmp_path):
    counts = _share(tiny_model, cold, tmp_path, {"shm": False}, "auto")
    assert counts.get("PutShm", 0) == 0 and counts.get("GetShm", 0) == 0
    assert counts.get("Put", 0) >= 1 and counts.get("Get", 0) == 1


def test_shm_required_but_refused_is_a_startup_error(tiny_model, tmp_path):
    with daemon_process({"shm": False}, tmp_path) as (url, _):
        with pytest.raises(ConfigError) as info:
            make_llm(tiny_model, kv_config(kvstore_url=url, kvstore_shm=True))
    assert str(info.value).startswith("kv_transfer_config.kv_connector_extra_config.kvstore_shm: the daemon "
                                      "refused shared memory (AttachShm: FAILED_PRECONDITION: shared memory is off")


@pytest.mark.parametrize("value, message", [
    ("yes", 'kv_transfer_config.kv_connector_extra_config.kvstore_shm: Value error, expected "auto", true or false'),
    (1, 'kv_transfer_config.kv_connector_extra_config.kvstore_shm: Value error, expected "auto", true or false'),
])
def test_bad_kvstore_shm_values_name_the_key(value, message):
    with pytest.raises(ConfigError) as info:
        parse_kv_transfer_config(kv_config(kvstore_url="grpc://127.0.0.1:1", kvstore_shm=value))
    assert str(info.value) == message


def test_kvstore_shm_true_needs_a_daemon():
    with pytest.raises(ConfigError, match="kvstore_shm: true needs a kvstore_url"):
        parse_kv_transfer_config(kv_config(kvstore_shm=True))
