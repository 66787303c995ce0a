"""What the fuzz tests (tests/fuzz/test_fuzz_*.py) found: each case as an explicit regression test.

A case still marked xfail(strict=True) is a bug not fixed yet: once it is, the strict xfail fails and
the marker goes (the fuzz strategies steer clear of these exact inputs so that they keep searching
for new ones; see each reason).
"""

from __future__ import annotations

import pytest

from engine.connector.config import parse_kv_transfer_config
from kvstore.config import ConfigError, load_store_config, parse_store_config

HUGE_SIZE = "9" * 400 + "TiB"   # float("9" * 400) is inf: int(inf) raises OverflowError


def test_kv_transfer_config_huge_size_string_is_a_config_error():
    with pytest.raises(ConfigError, match="cpu_bytes_to_use"):
        parse_kv_transfer_config({"kv_connector": "OffloadingConnector",
                                  "kv_connector_extra_config": {"cpu_bytes_to_use": HUGE_SIZE}})


def test_store_config_huge_tier_bytes_is_a_config_error():
    with pytest.raises(ConfigError, match="bytes"):
        parse_store_config({"tiers": [{"type": "memory", "bytes": "9" * 400}]})


def test_store_config_huge_max_message_bytes_is_a_config_error():
    with pytest.raises(ConfigError, match="max_message_bytes"):
        parse_store_config({"max_message_bytes": HUGE_SIZE})


def test_kv_transfer_config_integer_of_5000_digits_is_a_config_error():
    text = ('{"kv_connector": "OffloadingConnector", "kv_connector_extra_config": {"cpu_bytes_to_use": '
            + "9" * 5000 + "}}")
    with pytest.raises(ConfigError, match="kv_transfer_config"):
        parse_kv_transfer_config(text)


def test_kv_transfer_config_deep_nesting_is_a_config_error():
    with pytest.raises(ConfigError, match="kv_transfer_config"):
        parse_kv_transfer_config('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")


def test_store_config_file_deep_nesting_is_a_config_error(tmp_path):
    path = tmp_path / "store.yaml"
    path.write_text("x: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError):
        load_store_config(path)


@pytest.mark.xfail(strict=True,
                   reason="kvstore.config._describe: a key holding a lone surrogate is reported as '(top level): "
                          "Input should be a valid string' - the ConfigError names no key")
def test_store_config_surrogate_key_is_named(tmp_path):
    path = tmp_path / "store.yaml"
    path.write_text('"\\uD800": null\n')
    with pytest.raises(ConfigError) as raised:
        load_store_config(path)
    assert "(top level)" not in str(raised.value)
