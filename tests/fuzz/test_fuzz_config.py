"""Property-based fuzzing of the config parsers: `parse_kv_transfer_config` (the engine's
`--kv-transfer-config`) and the kvstore daemon's `parse_store_config` / `load_store_config`.

Property: each returns a config or raises its module's ConfigError (a ValueError) whose message names
a key (or, for a value that is not a mapping at all, says so); never any other exception type, and
never the value of a credential.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from engine.connector.config import KVTransferConfig, OffloadConfig, parse_kv_transfer_config
from fuzz_common import count, fuzz_settings, outcome
from kvstore.config import (ConfigError, MemoryTierConfig, ObjTierConfig, RedisTierConfig, StoreConfig,
                            load_store_config, parse_store_config)

SECRET = "s3cr3t-F7Q2"   # planted in credential fields: never echoed by an error

KEYS = set()
for _model in (KVTransferConfig, OffloadConfig, StoreConfig, MemoryTierConfig, RedisTierConfig, ObjTierConfig):
    KEYS |= set(_model.model_fields)

# ---- strategies ----------------------------------------------------------------------------------

HUGE_INTS = st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 10**400])
NUMBERS = st.one_of(st.integers(), HUGE_INTS, st.floats(allow_nan=True, allow_infinity=True))
SIZES = st.one_of(NUMBERS, st.sampled_from(["8GiB", "512 MiB", "1.5GB", "1e9", "-1GiB", "GiB", "1.5.5GB", "nan", "inf", " 1 kib ", "1\nGiB", "0x10", "½GB"]))
TEXT = st.one_of(st.text(max_size=40), st.text(st.characters(codec="utf-8"), max_size=10),
                 st.sampled_from(["", " ", "\x00", "\ud800", "redis://h:1/0", "redis://:" + SECRET + "@h:6379/3",
                                  "unix:///tmp/r.sock", "grpc://h:1", "grpcs://[::1]:50051", "rediss://h",
                                  "http://x", "auto", "save_all", "pkg.module:Name", "a" * 10_000]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSONISH = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.one_of(TEXT, st.sampled_from(sorted(KEYS))),
                                                                        inner, max_size=4)),
                       max_leaves=12)

TIER_TYPES = st.sampled_from(["memory", "redis", "obj", "s3", "MEMORY", "", "slab", None, 1])


def field_value(name: str) -> st.SearchStrategy:
    """A value for config key `name`: often plausible, often not."""
    plausible = {
        "bytes": SIZES, "cpu_bytes_to_use": SIZES, "slot_bytes": SIZES, "max_message_bytes": SIZES,
        "url": TEXT, "kvstore_url": TEXT, "listen": TEXT, "kvstore_shm": st.sampled_from(["auto", True, False, "yes", 1]),
        "ttl_s": NUMBERS, "policy": st.one_of(st.fixed_dictionaries({"name": TEXT}), JSONISH),
        "access_key": st.just(SECRET), "secret_key": st.just(SECRET), "auth_token": st.just(SECRET),
        "tls_cert": TEXT, "tls_key": TEXT,
    }
    return st.one_of(plausible.get(name, NUMBERS), SCALARS, JSONISH)


@st.composite
def shaped_dict(draw, keys: list[str], required: dict[str, st.SearchStrategy] | None = None) -> dict:
    """A dict of some of `keys` (random values), the `required` ones usually, and an odd unknown key now and then."""
    out = {}
    for name, strategy in (required or {}).items():
        if draw(st.integers(0, 9)):
            out[name] = draw(strategy)
    for name in draw(st.lists(st.sampled_from(keys), unique=True, max_size=6)):
        out[name] = draw(field_value(name))
    if not draw(st.integers(0, 7)):
        out[draw(TEXT)] = draw(SCALARS)
    return out


TIER_KEYS = sorted(set(MemoryTierConfig.model_fields) | set(RedisTierConfig.model_fields)
                   | set(ObjTierConfig.model_fields))
TIER = shaped_dict(TIER_KEYS, {"type": TIER_TYPES, "bucket": st.sampled_from(["b", "my-bucket", "", "x" * 64])})
TIERS = st.one_of(st.lists(st.one_of(TIER, JSONISH), max_size=4), JSONISH)
OFFLOAD_KEYS = sorted(OffloadConfig.model_fields)
EXTRA = st.one_of(shaped_dict(OFFLOAD_KEYS, {"secondary_tiers": TIERS}), JSONISH)
KV_TRANSFER = shaped_dict(["kv_connector", "kv_role", "kv_connector_extra_config"], {
    "kv_connector": st.one_of(st.sampled_from(["OffloadingConnector", "TierKVConnector", "LMCache"]), SCALARS),
    "kv_role": st.one_of(st.sampled_from(["kv_both", "kv_producer", "kv_consumer", "both"]), SCALARS),
    "kv_connector_extra_config": EXTRA})
STORE = shaped_dict(sorted(StoreConfig.model_fields), {"tiers": TIERS})


VALID_TIER = st.one_of(
    st.fixed_dictionaries({"type": st.just("memory")}, optional={"bytes": st.sampled_from([0, 1 << 20, "8GiB", "1.5GB"]),
                                                                 "ttl_s": st.floats(1, 1e6)}),
    st.fixed_dictionaries({"type": st.just("redis")}, optional={"url": st.sampled_from(["redis://h:1/0", "rediss://h"]),
                                                                "pool_size": st.integers(4, 1024)}),
    st.fixed_dictionaries({"type": st.sampled_from(["obj", "s3"]), "bucket": st.sampled_from(["bkt", "my-bucket"])},
                          optional={"max_attempts": st.integers(1, 10)}))
VALID_EXTRA = st.fixed_dictionaries({}, optional={
    "cpu_bytes_to_use": st.one_of(st.integers(0, 2**40), st.sampled_from(["8GiB", "512 MiB"])),
    "block_size": st.integers(1, 4096), "kvstore_url": st.sampled_from(["grpc://h:1", "grpcs://h:50051"]),
    "secondary_tiers": st.lists(VALID_TIER, max_size=2, unique_by=lambda t: t["type"].replace("s3", "obj")),
    "policy": st.just({"name": "save_all"}), "max_pending_saves": st.integers(1, 1000),
    "lookup_timeout_s": st.floats(0.01, 100), "kvstore_shm": st.sampled_from(["auto", False])})


@st.composite
def near_valid(draw, base: st.SearchStrategy, keys: list[str]) -> dict:
    """A valid config, half the time with one key (top level or nested) set to something random."""
    out = draw(base)
    if draw(st.booleans()):
        target = out
        if "kv_connector_extra_config" in out and draw(st.booleans()):
            target = out["kv_connector_extra_config"]
            keys = OFFLOAD_KEYS
        name = draw(st.sampled_from(keys))
        target[name] = draw(field_value(name))
    return out


VALID_KV_TRANSFER = near_valid(st.fixed_dictionaries({
    "kv_connector": st.sampled_from(["OffloadingConnector", "TierKVConnector"]),
    "kv_role": st.sampled_from(["kv_both", "kv_producer", "kv_consumer"]), "kv_connector_extra_config": VALID_EXTRA}),
    ["kv_connector", "kv_role", "kv_connector_extra_config"])
VALID_STORE = near_valid(st.fixed_dictionaries({}, optional={
    "tiers": st.lists(VALID_TIER, min_size=1, max_size=3, unique_by=lambda t: t["type"].replace("s3", "obj")),
    "listen": st.just("127.0.0.1:0"), "max_keys_per_call": st.integers(1, 10_000),
    "max_message_bytes": st.sampled_from(["64MiB", 1 << 20]), "stream_idle_timeout_s": st.floats(0.1, 3600)}),
    sorted(StoreConfig.model_fields))


def json_text(value) -> str:
    try:
        return json.dumps(value, allow_nan=True)
    except (ValueError, TypeError):
        return "{}"


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


RAW_JSON = st.one_of(st.text(max_size=60), st.sampled_from(
    ["", "{", "null", "[]", "1", '"x"', "NaN", '{"kv_connector": NaN}', '{"a": 1e999}', '{"kv_connector": "OffloadingConnector", "kv_connector": 1}', "\ufeff{}", '{"\\ud800": 1}']))


# ---- checks --------------------------------------------------------------------------------------

_GENERIC = re.compile(r"expected a (JSON object|mapping at the top level)|not valid (JSON|YAML)|cannot read")


def keys_of(value) -> set[str]:
    """Every dict key in `value`, at any depth, as text."""
    found: set[str] = set()
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:   # YAML anchors make cycles: `&a [*a]`
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            found |= {str(k) for k in item}
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def check_error(error: ConfigError, data) -> None:
    message = str(error)
    assert message, "a ConfigError without a message"
    if not any(SECRET in k for k in keys_of(data)):   # a key is named, even one that looks like a credential
        assert SECRET not in message, f"a credential echoed in: {message!r}"
    # A key that is not valid text (a lone surrogate) is named escaped, as backslashreplace spells it.
    spelled = {k.encode("ascii", "backslashreplace").decode() if _has_surrogate(k) else k for k in keys_of(data)}
    named = {k for k in KEYS | spelled | {"kv_transfer_config", "tiers"} if k and k in message}
    # The one key that cannot be spelled: "" (pydantic's location of an empty key reads "(top level)").
    unnamable = "(top level)" in message and "" in keys_of(data)
    assert named or unnamable or _GENERIC.search(message), f"a ConfigError that names no key: {message!r}"


def run_parser(parse, data, interface: str, content=None) -> None:
    """`parse(data)` returns or raises a ConfigError that names a key of `content` (default: `data`)."""
    count(interface)
    try:
        parse(data)
        outcome("config", "parsed")
    except ConfigError as error:
        outcome("config", "ConfigError")
        assert isinstance(error, ValueError)
        check_error(error, data if content is None else content)
    # any other exception propagates: the property's failure


# ---- the properties ------------------------------------------------------------------------------

@fuzz_settings(200)
@given(st.one_of(KV_TRANSFER, KV_TRANSFER.map(json_text), VALID_KV_TRANSFER, VALID_KV_TRANSFER.map(json_text),
                RAW_JSON, JSONISH))
@example({"kv_connector": "OffloadingConnector", "kv_connector_extra_config": {"cpu_bytes_to_use": float("nan")}})
@example({"kv_connector": "OffloadingConnector", "kv_connector_extra_config": {"secondary_tiers": "redis"}})
@example({"kv_connector": "OffloadingConnector", "kv_connector_extra_config": {"secondary_tiers": [1]}})
@example({"kv_connector": "OffloadingConnector", "kv_connector_extra_config": {"policy": []}})
def test_kv_transfer_config_fuzz(value):
    run_parser(parse_kv_transfer_config, value, "config.parse_kv_transfer_config")


@fuzz_settings(200)
@given(st.one_of(STORE, VALID_STORE, JSONISH))
@example({"tiers": [{"type": "redis", "url": "redis://:" + SECRET + "@h:1/0", "cluster": True}]})
@example({"tiers": [{"type": "memory", "bytes": "1.5.5GB"}]})
@example({"tiers": []})
def test_store_config_fuzz(data):
    run_parser(parse_store_config, data, "config.parse_store_config")


@fuzz_settings(150)
@given(st.one_of(st.one_of(STORE, VALID_STORE).map(lambda d: yaml.safe_dump(d, allow_unicode=True) if _dumpable(d) else "{}"),
                 st.text(max_size=80), st.sampled_from(["tiers: [", "- 1", "a: !!python/object:os.system x",
                                                        "&a [*a]", "tiers: &t [*t]", "\t", "%YAML 9.9\n---\n",
                                                        "listen: 127.0.0.1:1\nlisten: 1", "? [1]\n: 2", "\x00"])),
       st.sampled_from([".yaml", ".json", ".yml", ""]))
def test_load_store_config_fuzz(text, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "store" + suffix)
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        try:
            content = yaml.safe_load(text)
        except Exception:  # noqa: BLE001 - not YAML: the error names no key of it
            content = None
        run_parser(load_store_config, path, "config.load_store_config", content)


def _dumpable(d) -> bool:
    try:
        yaml.safe_dump(d)
        return True
    except Exception:  # noqa: BLE001 - a surrogate or a float key: write something else
        return False
