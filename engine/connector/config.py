"""`--kv-transfer-config`: vLLM's JSON shape, validated once at start-up.

```json
{"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
 "kv_connector_extra_config": {"spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": 10000000000,
   "block_size": 256, "kvstore_url": "grpc://host:50051",
   "secondary_tiers": [{"type": "redis", "url": "redis://host:6379/0"}, {"type": "obj", ...}],
   "policy": {"name": "save_all"}}}
```
No `kvstore_url`: the same tiers run in-process (the embedded store).
`kvstore_shm` ("auto" | true | false): map the daemon's slab and move block bytes by DMA into its
slots when it runs on this host (auto: when `kvstore_url` names a loopback address and the slab's
slots hold one block of this engine; true: always, and a slab that cannot serve the engine is a
start-up error; false: always the gRPC payload path).
vLLM's other KVTransferConfig keys (`VLLM_ONLY_KEYS`: kv_rank, kv_ip, ...) are accepted, with one warning
that they have no effect, so a vLLM config works unchanged; any other unknown key is an error.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from kvstore.config import ConfigError, TierConfig, parse_bytes, parse_tiers

logger = logging.getLogger(__name__)

CONNECTOR_NAMES = ("OffloadingConnector", "TierKVConnector")
# vLLM's KVTransferConfig fields that only its other connectors (P2P NCCL, NIXL, Mooncake, ...) or its
# scheduler read; the offloading connector here has no use for them.
VLLM_ONLY_KEYS = ("engine_id", "kv_buffer_device", "kv_buffer_size", "kv_rank", "kv_parallel_size", "kv_ip",
                  "kv_port", "kv_connector_module_path", "enable_permute_local_kv", "kv_load_failure_policy")
# The ignored keys (and values) already warned about: start-up parses one config twice (EngineConfig
# checks it before the weights load, the engine core builds the connector from it), one warning is enough.
_warned: set[tuple[tuple[str, str], ...]] = set()
SPEC_NAMES = ("TieringOffloadingSpec", "CPUOffloadingSpec")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class OffloadConfig(_Strict):
    """`kv_connector_extra_config`: where offloaded KV blocks go and who decides."""

    spec_name: Literal[SPEC_NAMES] = "TieringOffloadingSpec"
    cpu_bytes_to_use: Annotated[int, Field(ge=0)] = 4 * 2**30
    block_size: Annotated[int, Field(ge=1)] = 256
    kvstore_url: str | None = None
    auth_token: SecretStr | None = None
    auth_token_env: str | None = None
    secondary_tiers: list[dict[str, Any]] = Field(default_factory=list)
    policy: dict[str, Any] = Field(default_factory=lambda: {"name": "save_all"})
    max_pending_saves: Annotated[int, Field(ge=1)] = 64
    lookup_timeout_s: Annotated[float, Field(gt=0)] = 1.0
    load_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    kvstore_shm: bool | Literal["auto"] = "auto"
    load_cost_model: bool = True

    @field_validator("cpu_bytes_to_use", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_bytes(value)

    @field_validator("kvstore_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("grpc://", "grpcs://")):
            raise ValueError("expected grpc://host:port or grpcs://host:port")
        return value

    @field_validator("kvstore_shm", mode="before")
    @classmethod
    def _shm(cls, value: Any) -> bool | str:
        if value is True or value is False or value == "auto":
            return value
        raise ValueError('expected "auto", true or false')

    @model_validator(mode="after")
    def _shm_needs_daemon(self) -> "OffloadConfig":
        if self.kvstore_shm is True and self.kvstore_url is None:
            raise ValueError("kvstore_shm: true needs a kvstore_url (the embedded store shares the engine's memory)")
        return self

    @field_validator("policy")
    @classmethod
    def _policy(cls, value: dict[str, Any]) -> dict[str, Any]:
        if ("name" in value) == ("class" in value):
            raise ValueError('expected exactly one of "name" (a built-in policy) or "class" ("pkg.module:Name")')
        return value

    def tiers(self) -> list[TierConfig]:
        """The embedded store's tiers: CPU memory first, then the secondary tiers in order."""
        memory = [{"type": "memory", "bytes": self.cpu_bytes_to_use}] if self.cpu_bytes_to_use else []
        return parse_tiers(memory + list(self.secondary_tiers))


class KVTransferConfig(_Strict):
    """The whole `--kv-transfer-config` object."""

    kv_connector: Literal[CONNECTOR_NAMES]
    kv_role: Literal["kv_both", "kv_producer", "kv_consumer"] = "kv_both"
    kv_connector_extra_config: OffloadConfig = Field(default_factory=OffloadConfig)

    @property
    def offload(self) -> OffloadConfig:
        return self.kv_connector_extra_config

    @property
    def can_save(self) -> bool:
        return self.kv_role in ("kv_both", "kv_producer")

    @property
    def can_load(self) -> bool:
        return self.kv_role in ("kv_both", "kv_consumer")


def parse_kv_transfer_config(value: str | dict) -> KVTransferConfig:
    """Parse and validate; a ConfigError names the offending key (never echoes a secret)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"kv_transfer_config: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        except RecursionError:
            raise ConfigError("kv_transfer_config: nested too deeply") from None
        except ValueError as e:   # an integer of more digits than Python converts
            raise ConfigError(f"kv_transfer_config: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError("kv_transfer_config: expected a JSON object")
    ignored = sorted(key for key in value if key in VLLM_ONLY_KEYS)
    try:
        cfg = KVTransferConfig.model_validate({k: v for k, v in value.items() if k not in VLLM_ONLY_KEYS})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = _unknown_key(err["loc"]) if err["type"] == "extra_forbidden" else err["msg"]
        raise ConfigError(f"kv_transfer_config.{where}: {msg}") from None
    try:
        parse_tiers(cfg.offload.secondary_tiers)
    except ConfigError as e:
        raise ConfigError(f"kv_transfer_config.kv_connector_extra_config.secondary_tiers: {e}") from None
    _warn_ignored({key: value[key] for key in ignored})
    return cfg


def _unknown_key(loc: tuple) -> str:
    """"unknown key", and the keys accepted where it was found."""
    model: type[BaseModel] = KVTransferConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return "unknown key"
        model = field.annotation
    accepted = f"unknown key; accepted keys: {', '.join(model.model_fields)}"
    if model is KVTransferConfig:
        accepted += f" (and vLLM's {', '.join(VLLM_ONLY_KEYS)}, which have no effect here)"
    return accepted


def _warn_ignored(ignored: dict[str, Any]) -> None:
    """One warning naming the vLLM-only keys given (never their values: one could be a secret)."""
    if not ignored:
        return
    seen = tuple((key, repr(value)) for key, value in ignored.items())
    if seen in _warned:
        return
    _warned.add(seen)
    logger.warning("kv_transfer_config: %s accepted for vLLM compatibility but ignored: they configure vLLM's "
                   "other connectors and have no effect on tierkv's offloading connector", ", ".join(ignored))
