"""Typed configuration of the store: tier objects and the daemon's YAML/JSON file.

Tier objects are the same dicts the engine's `--kv-transfer-config` lists under
"secondary_tiers", so one description serves both programs. Everything is validated here, once;
inner code trusts these models. Errors name the offending key and what was expected, and never
echo the value (it may be a credential).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import parse_qs, urlsplit, urlunsplit

import yaml
from pydantic import (BaseModel, ByteSize, ConfigDict, Field, SecretStr, TypeAdapter, ValidationError, ValidationInfo,
                      field_validator, model_validator)

_BYTE_SIZE = TypeAdapter(ByteSize)
_SIZE_EXPECTED = "expected a byte size such as 8GiB, 512MiB or an integer"
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or malformed; the message names the key."""


# The longest TTL a put or a tier may set. Bounded (and finite) so every tier can hold the deadline:
# Redis takes PX as a 64-bit millisecond count, and a put with ttl_s=1e300 or inf made every SET fail,
# which marked Redis down for every client of the daemon.
MAX_TTL_S = 10 * 365 * 86400.0
TtlSeconds = Annotated[float, Field(gt=0, le=MAX_TTL_S)]


def check_ttl_s(ttl_s: float | None) -> None:
    """Raise ValueError unless `ttl_s` is None or a finite number of seconds in (0, MAX_TTL_S]."""
    if ttl_s is not None and not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl_s: must be a positive number of seconds, at most {MAX_TTL_S:.0f} (10 years)")


def check_expires_at(expires_at: float | None, now: float, field: str = "expires_at") -> None:
    """Raise ValueError (naming `field`) unless `expires_at` is None (no expiry) or wall-clock
    seconds in (0, now + MAX_TTL_S]: an absolute expiry is held to the same bound as a TTL."""
    if expires_at is not None and not 0 < expires_at <= now + MAX_TTL_S:
        raise ValueError(f"{field}: must be wall-clock seconds > 0 and at most {MAX_TTL_S:.0f} s (10 years) ahead")


def parse_bytes(value: int | str) -> int:
    """`8589934592`, `"8GiB"`, `"512 MiB"`, `"1.5GB"` -> a byte count (pydantic's `ByteSize`: binary
    and decimal units, in any case)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(_SIZE_EXPECTED)
    if isinstance(value, int) and value < 0:
        raise ValueError("expected a non-negative byte size")
    try:
        size = _BYTE_SIZE.validate_python(value)
    except ValidationError:
        raise ValueError(_SIZE_EXPECTED) from None
    except OverflowError:   # a number of over 308 digits is an infinite float to pydantic
        size = 2**63
    if size >= 2**63:
        raise ValueError("expected a byte size below 8 EiB")
    return int(size)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemoryTierConfig(_Strict):
    """CPU memory: a byte budget; LRU-by-prefix eviction writes blocks down to the next tier.

    With `slot_bytes`, the budget is a slab of `bytes // slot_bytes` slots in a /dev/shm segment
    (kvstore/tiers/slab.py) that engines on the daemon's host map, so block bytes never cross gRPC;
    `slot_bytes` must then be the engines' offloaded block size.
    """

    type: Literal["memory"]
    name: str | None = None
    bytes: Annotated[int, Field(ge=0)] = 8 * 2**30
    slot_bytes: Annotated[int, Field(ge=1)] | None = None
    ttl_s: TtlSeconds | None = None
    verify_reads: bool = True

    @field_validator("bytes", "slot_bytes", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int | None:
        return None if value is None else parse_bytes(value)

    @field_validator("slot_bytes")
    @classmethod
    def _slots_fit(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value > info.data.get("bytes", value):
            raise ValueError("must be at most bytes (the slab holds bytes // slot_bytes slots)")
        return value

    @property
    def tier_name(self) -> str:
        return self.name or self.type


class RedisTierConfig(_Strict):
    """Redis (one server, or a Redis Cluster with `cluster: true`): each batch is split into
    pipelines on `batch_connections` connections in parallel, from a pool of `pool_size` (per node
    of a cluster); short timeouts so a dead Redis costs milliseconds."""

    type: Literal["redis"]
    name: str | None = None
    url: SecretStr = SecretStr("redis://localhost:6379/0")
    cluster: bool = False
    key_prefix: str = "tierkv:"
    ttl_s: TtlSeconds | None = 86400.0
    bytes: Annotated[int, Field(ge=0)] | None = None
    pool_size: Annotated[int, Field(ge=1, le=1024)] = 16
    # Pipelines one batch is cut into, run at once. 4: on 2 cores 1-8 measured alike (the client is
    # CPU-bound parsing); against a remote server more of them overlap the network with parsing.
    batch_connections: Annotated[int, Field(ge=1, le=64)] = 4
    connect_timeout_s: Annotated[float, Field(gt=0)] = 0.2
    socket_timeout_s: Annotated[float, Field(gt=0)] = 2.0

    @field_validator("bytes", mode="before")
    @classmethod
    def _server_budget(cls, value: Any) -> None:
        # Redis enforces its own budget far better than a client could (it sees every writer).
        if value is not None:
            raise ValueError("a Redis byte budget is set on the server: maxmemory with maxmemory-policy "
                             "allkeys-lru (keys it evicts are misses); leave bytes null here")
        return None

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: SecretStr) -> SecretStr:
        scheme = urlsplit(url.get_secret_value()).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("expected a redis://, rediss:// or unix:// URL")
        return url

    @field_validator("cluster")
    @classmethod
    def _cluster_url(cls, cluster: bool, info: ValidationInfo) -> bool:
        url = info.data.get("url")
        if cluster and url is not None:
            parts = urlsplit(url.get_secret_value())
            if parts.scheme == "unix":
                raise ValueError("a Redis Cluster is reached over redis:// or rediss:// (any one node's "
                                 "host:port), not unix://")
            if parts.path.strip("/") not in ("", "0") or parse_qs(parts.query).get("db", ["0"]) != ["0"]:
                raise ValueError("a Redis Cluster has only database 0: leave the URL's database out or 0")
        return cluster

    @field_validator("batch_connections")
    @classmethod
    def _within_pool(cls, value: int, info: ValidationInfo) -> int:
        if value > info.data.get("pool_size", value):
            raise ValueError("must be at most pool_size (each parallel pipeline holds one pooled connection)")
        return value

    @property
    def tier_name(self) -> str:
        return self.name or self.type

    @property
    def safe_url(self) -> str:
        """The URL without its password, for logs."""
        parts = urlsplit(self.url.get_secret_value())
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class ObjTierConfig(_Strict):
    """An S3-compatible object store; one object per block, many blocks in flight."""

    type: Literal["obj", "s3"]
    name: str | None = None
    bucket: str
    endpoint_override: str | None = None
    scheme: Literal["http", "https"] = "https"
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    region: str = "us-east-1"
    key_prefix: str = "tierkv/"
    ttl_s: TtlSeconds | None = None
    max_inflight: Annotated[int, Field(ge=1, le=1024)] = 32
    connect_timeout_s: Annotated[float, Field(gt=0)] = 0.5
    read_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 2

    @field_validator("type")
    @classmethod
    def _alias(cls, value: str) -> str:
        return "obj"

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        # S3's own rule; a name it refuses would only fail at the first request, as a tier outage.
        if not _BUCKET_RE.fullmatch(value):
            raise ValueError("expected an S3 bucket name: 3-63 characters, lowercase letters, digits, dots and "
                             "hyphens, beginning and ending with a letter or digit")
        return value

    @model_validator(mode="after")
    def _keys_in_pairs(self) -> "ObjTierConfig":
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("access_key and secret_key must be given together (or neither, for the default chain)")
        return self

    @property
    def tier_name(self) -> str:
        return self.name or self.type

    @property
    def endpoint_url(self) -> str | None:
        return f"{self.scheme}://{self.endpoint_override}" if self.endpoint_override else None


TierConfig = Annotated[Union[MemoryTierConfig, RedisTierConfig, ObjTierConfig], Field(discriminator="type")]
_TIER_LIST = TypeAdapter(list[TierConfig])


def _check_unique_names(tiers: list[TierConfig]) -> None:
    names = [t.tier_name for t in tiers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"tier names must be unique; repeated: {duplicates} (add a 'name:' key)")


def _check_slab_first(tiers: list[TierConfig]) -> None:
    # Same-host engines lease slots of the slab and the daemon promotes into it from the tiers
    # below: one slab, above every other tier.
    for i, tier in enumerate(tiers[1:], start=1):
        if isinstance(tier, MemoryTierConfig) and tier.slot_bytes is not None:
            raise ValueError(f"tiers.{i}.memory.slot_bytes: only the first tier may be a slab (the tier "
                             f"same-host engines map)")


class StoreConfig(_Strict):
    """The daemon's config file (`kvstore serve --config`)."""

    listen: str = "127.0.0.1:50051"
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    # A port on the listen host where a server of its own answers health checks, never queued
    # behind data calls (kvstore/health_server.py); None: health checks on `listen` only.
    health_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    auth_token_env: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tiers: list[TierConfig] = Field(default_factory=lambda: [MemoryTierConfig(type="memory")], min_length=1)
    promote_on_hit: bool = True
    max_message_bytes: Annotated[int, Field(ge=1024)] = 64 * 2**20
    # Block bytes of Put streams the daemon holds at once (received, not yet in the store; None:
    # `inflight_put_bytes`' default); a block that would pass it waits up to inflight_put_wait_s
    # (and the call's deadline) for others to be stored, then is refused (RESOURCE_EXHAUSTED).
    max_inflight_put_bytes: Annotated[int, Field(ge=1024)] | None = None
    inflight_put_wait_s: Annotated[float, Field(ge=0, le=3600)] = 10.0
    max_keys_per_call: Annotated[int, Field(ge=1)] = 4096
    max_key_bytes: Annotated[int, Field(ge=1)] = 64
    max_namespace_len: Annotated[int, Field(ge=1)] = 128
    # Same-host engines attached to the slab at once (each session holds one RPC thread).
    shm_max_sessions: Annotated[int, Field(ge=0)] = 16
    # KVStore calls running at once (each holds an RPC thread; Put streams at most half of them),
    # how long a stream may wait on its peer, and the HTTP/2 pings that find dead peers.
    max_concurrent_rpcs: Annotated[int, Field(ge=2, le=4096)] = 64
    stream_idle_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    keepalive_time_s: Annotated[float, Field(ge=1, le=86400)] = 60.0
    keepalive_timeout_s: Annotated[float, Field(ge=1, le=3600)] = 20.0

    @field_validator("max_message_bytes", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_bytes(value)

    @field_validator("max_inflight_put_bytes", mode="before")
    @classmethod
    def _optional_size(cls, value: Any) -> int | None:
        return None if value is None else parse_bytes(value)

    @field_validator("max_inflight_put_bytes")
    @classmethod
    def _holds_a_block(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value < info.data.get("max_message_bytes", 0):
            raise ValueError("must be at least max_message_bytes (the largest block), or no Put of such a block "
                             "could ever be admitted")
        return value

    @property
    def inflight_put_bytes(self) -> int:
        """The cap on Put bytes held in flight: `max_inflight_put_bytes`, by default half the memory
        tiers' budget (in flight and stored, the daemon then holds at most 1.5 times its budget in
        blocks), and never less than one block of max_message_bytes."""
        if self.max_inflight_put_bytes is not None:
            return self.max_inflight_put_bytes
        memory = sum(tier.bytes for tier in self.tiers if isinstance(tier, MemoryTierConfig))
        return max(self.max_message_bytes, memory // 2)

    @model_validator(mode="after")
    def _consistent(self) -> "StoreConfig":
        _check_unique_names(self.tiers)
        _check_slab_first(self.tiers)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return self


def _describe(error: ValidationError, where: str) -> ConfigError:
    """A message naming each bad key and what was expected, without echoing values."""
    lines = []
    for item in error.errors(include_input=False, include_url=False):
        loc = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where}{'.' if where and loc else ''}{loc}: {message}")
    return ConfigError("invalid kvstore config: " + "; ".join(lines))


def _check_keys_are_text(data: Any, where: str) -> None:
    """Raise ConfigError naming the first mapping key that is not valid Unicode text (a lone
    surrogate, from a YAML or JSON escape): pydantic reports it with no key at all ("(top level)")."""
    pending: list[tuple[Any, str]] = [(data, where)]
    seen: set[int] = set()   # YAML anchors can make a container hold itself
    while pending:   # a loop, not recursion: parsed configs may nest thousands deep
        value, path = pending.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, child in items:
            name = key if isinstance(key, str) else str(key)
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                shown = name.encode("ascii", "backslashreplace").decode()
                raise ConfigError(f"invalid kvstore config: {path}{'.' if path else ''}{shown}: a key that is not "
                                  f"valid Unicode text (a lone surrogate)") from None
            pending.append((child, f"{path}.{name}" if path else name))


def parse_tiers(tiers: list[dict]) -> list[TierConfig]:
    """Validate a list of tier dicts (the engine's "secondary_tiers" shape)."""
    _check_keys_are_text(tiers, "tiers")
    try:
        parsed = _TIER_LIST.validate_python(tiers)
        _check_unique_names(parsed)
    except ValidationError as error:
        raise _describe(error, "tiers") from None
    except ValueError as error:
        raise ConfigError(f"invalid kvstore config: tiers: {error}") from None
    return parsed


def parse_store_config(data: dict) -> StoreConfig:
    """Validate an already-loaded config mapping."""
    if not isinstance(data, dict):
        raise ConfigError("invalid kvstore config: expected a mapping at the top level")
    _check_keys_are_text(data, "")
    try:
        return StoreConfig.model_validate(data)
    except ValidationError as error:
        raise _describe(error, "") from None


def load_store_config(path: str | Path) -> StoreConfig:
    """Read a YAML or JSON config file (chosen by suffix; YAML otherwise)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read kvstore config {path}: {error.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"kvstore config {path} is nested too deeply") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"kvstore config {path} is not valid JSON: {error.msg} at line {error.lineno}") from None
    except yaml.YAMLError as error:
        # Only the position: the YAML error's snippet could quote a credential.
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"kvstore config {path} is not valid YAML{where}") from None
    return parse_store_config(data or {})
