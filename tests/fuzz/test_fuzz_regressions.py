"""What the fuzz tests (tests/fuzz/test_fuzz_*.py) found: each case as an explicit regression test.

Each was a strict xfail until fixed; a new finding is pinned the same way (xfail(strict=True), which
fails loudly once fixed, and then the marker goes).
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


def test_store_config_surrogate_key_is_named(tmp_path):
    path = tmp_path / "store.yaml"
    path.write_text('"\\uD800": null\n')
    with pytest.raises(ConfigError) as raised:
        load_store_config(path)
    assert str(raised.value) == ("invalid kvstore config: \\ud800: a key that is not valid Unicode text "
                                 "(a lone surrogate)")


def test_store_config_nested_surrogate_key_is_named():
    with pytest.raises(ConfigError) as raised:
        parse_store_config({"tiers": [{"type": "memory", "\ud800": 1}]})
    assert str(raised.value) == ("invalid kvstore config: tiers.0.\\ud800: a key that is not valid Unicode "
                                 "text (a lone surrogate)")
