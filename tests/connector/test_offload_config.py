"""A bad `--kv-transfer-config` is a start-up error that names the key (and never echoes a secret)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from fixtures_services import free_port
from engine.connector.config import parse_kv_transfer_config
from kvstore.config import ConfigError
from tests.connector.offload_helpers import REPO, daemon_in_process, kv_config, make_llm

EXTRA = "kv_transfer_config.kv_connector_extra_config"


def _dead_port() -> int:
    return free_port()  # nothing listens there


@pytest.mark.parametrize("cfg, message", [
    ({"kv_connector": "OffloadingConnector", "kv_rol": "kv_both"}, "kv_transfer_config.kv_rol: unknown key"),
    (kv_config(blok_size=256), f"{EXTRA}.blok_size: unknown key"),
    (kv_config(block_size="big"), f"{EXTRA}.block_size: Input should be a valid integer"),
    (kv_config(block_size=200), f"{EXTRA}.block_size: expected a multiple of the engine's block_size \\(16\\)"),
    (kv_config(cpu_bytes_to_use="lots"), f"{EXTRA}.cpu_bytes_to_use: .*expected a byte size"),
    (kv_config(max_pending_saves=0), f"{EXTRA}.max_pending_saves: Input should be greater than or equal to 1"),
    (kv_config(kvstore_url="http://127.0.0.1:1"), f"{EXTRA}.kvstore_url: .*expected grpc://host:port"),
    ({"kv_connector": "LMCacheConnectorV1"}, "kv_transfer_config.kv_connector: Input should be 'OffloadingConnector'"),
    ({"kv_connector": "OffloadingConnector", "kv_role": "both"}, "kv_transfer_config.kv_role: Input should be"),
    (kv_config(secondary_tiers=[{"type": "floppy"}]), f"{EXTRA}.secondary_tiers: .*type"),
])
def test_bad_config_names_the_key(tiny_model, cfg, message):
    with pytest.raises(ConfigError, match=message):
        make_llm(tiny_model, cfg)


def test_unreachable_redis_tier_is_a_startup_error(tiny_model):
    tier = {"type": "redis", "url": f"redis://:hunter2@127.0.0.1:{_dead_port()}/0"}
    with pytest.raises(ConfigError, match=f"{EXTRA}.secondary_tiers.0: tier 'redis' is unreachable") as err:
        make_llm(tiny_model, kv_config(secondary_tiers=[tier]))
    assert "hunter2" not in str(err.value)


def test_unreachable_daemon_is_a_startup_error(tiny_model):
    with pytest.raises(ConfigError, match=f"{EXTRA}.kvstore_url: cannot reach the kvstore daemon"):
        make_llm(tiny_model, kv_config(kvstore_url=f"grpc://127.0.0.1:{_dead_port()}"))


def test_unreachable_s3_tier_is_a_startup_error(tiny_model):
    tier = {"type": "obj", "bucket": "bkt", "endpoint_override": f"127.0.0.1:{_dead_port()}", "scheme": "http",
            "access_key": "ak", "secret_key": "sk-secret", "connect_timeout_s": 0.2, "max_attempts": 1}
    with pytest.raises(ConfigError, match=f"{EXTRA}.secondary_tiers.0: tier 'obj' is unreachable") as err:
        make_llm(tiny_model, kv_config(secondary_tiers=[tier]))
    assert "sk-secret" not in str(err.value)


@pytest.mark.slow
def test_serve_refuses_to_start_with_a_bad_config(tiny_model):
    bad = '{"kv_connector": "OffloadingConnector", "kv_connector_extra_config": {"block_size": 256, "polcy": {}}}'
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "serve", tiny_model, "--dtype", "float32",
                           "--port", str(free_port()), "--kv-transfer-config", bad],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode != 0
    assert f"{EXTRA}.polcy: unknown key" in proc.stderr


def test_daemon_url_with_embedded_tier_keys_warns_that_they_are_ignored(tiny_model, caplog):
    with daemon_in_process([{"type": "memory", "bytes": "16MiB"}]) as (url, _):
        llm = make_llm(tiny_model, kv_config(kvstore_url=url, cpu_bytes_to_use="1GiB"))
        llm.engine.core.close()
    assert f"{EXTRA}: cpu_bytes_to_use ignored: with kvstore_url the daemon's own config sets its tiers" in caplog.text


VLLM_KEYS = {"engine_id": "e-1", "kv_buffer_device": "cuda", "kv_buffer_size": 1e9, "kv_rank": 0,
             "kv_parallel_size": 2, "kv_ip": "10.9.8.7", "kv_port": 14579, "kv_connector_module_path": "m.c",
             "enable_permute_local_kv": False, "kv_load_failure_policy": "recompute"}


def test_vllms_other_keys_are_accepted_with_one_warning(caplog):
    cfg = {**kv_config(), **VLLM_KEYS}
    with caplog.at_level(logging.WARNING, logger="engine.connector.config"):
        first = parse_kv_transfer_config(cfg)
        again = parse_kv_transfer_config(cfg)   # start-up parses the config twice: still one warning
    assert first == again == parse_kv_transfer_config(kv_config())
    assert [r.getMessage() for r in caplog.records] == [
        "kv_transfer_config: enable_permute_local_kv, engine_id, kv_buffer_device, kv_buffer_size, "
        "kv_connector_module_path, kv_ip, kv_load_failure_policy, kv_parallel_size, kv_port, kv_rank accepted "
        "for vLLM compatibility but ignored: they configure vLLM's other connectors and have no effect on "
        "tierkv's offloading connector"]


def test_an_unknown_key_names_it_and_lists_the_accepted_ones():
    with pytest.raises(ConfigError) as top:
        parse_kv_transfer_config({**kv_config(), "kv_rankk": 0})
    assert str(top.value) == (
        "kv_transfer_config.kv_rankk: unknown key; accepted keys: kv_connector, kv_role, kv_connector_extra_config "
        "(and vLLM's engine_id, kv_buffer_device, kv_buffer_size, kv_rank, kv_parallel_size, kv_ip, kv_port, "
        "kv_connector_module_path, enable_permute_local_kv, kv_load_failure_policy, which have no effect here)")
    with pytest.raises(ConfigError) as extra:
        parse_kv_transfer_config(kv_config(kv_rank=0))   # a top-level vLLM key inside the extra config
    assert str(extra.value) == (
        f"{EXTRA}.kv_rank: unknown key; accepted keys: spec_name, cpu_bytes_to_use, block_size, kvstore_url, "
        "auth_token, auth_token_env, secondary_tiers, policy, max_pending_saves, lookup_timeout_s, load_timeout_s, "
        "kvstore_shm, load_cost_model")
