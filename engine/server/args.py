"""`tierkv serve` arguments: flags, a YAML/JSON `--config` file under them, validated once.

The file takes the same names as the flags (`max-model-len: 512` or `max_model_len: 512`), plus
`model`; a flag given on the command line wins over the file. Engine options are checked by
`EngineConfig` itself; everything else here. The API key may come from the environment instead
(`API_KEY_ENV_VARS`), so that it need not be on a command line `ps` shows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from engine.config import EngineConfig

logger = logging.getLogger(__name__)

# Where the API key comes from when --api-key (or `api-key:` in --config) is not given, first set wins:
# tierkv's own name, then vLLM's, so a vLLM deployment's environment works unchanged.
API_KEY_ENV_VARS = ("TIERKV_API_KEY", "VLLM_API_KEY")


class ConfigError(ValueError):
    """A bad flag, config file or value; the message names the key and what was expected."""


@dataclass(frozen=True)
class ServeConfig:
    """What `tierkv serve` runs: where it listens, how it guards and sheds load, and the engine."""

    engine: EngineConfig
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None
    served_model_names: tuple[str, ...] = ()
    max_waiting_requests: int | None = None  # None: 4 x the engine's max_num_seqs
    max_request_body_bytes: int = 16 << 20
    shutdown_timeout: float = 10.0
    log_level: str = "info"
    log_stats: bool = True


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of exiting, so callers decide how to report it."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


# flag dest -> EngineConfig field, for the flags that configure the engine.
_ENGINE_FLAGS = {
    "max_model_len": "max_model_len",
    "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "long_prefill_token_threshold": "long_prefill_token_threshold",
    "block_size": "block_size",
    "dtype": "dtype",
    "seed": "seed",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "kv_cache_dtype": "kv_cache_dtype",
    "kv_transfer_config": "kv_transfer_config",
    "num_gpu_blocks_override": "num_gpu_blocks",
    "kv_cache_memory_bytes": "kv_cache_memory_bytes",
    "device": "device",
    "enable_prefix_caching": "enable_prefix_caching",
    "enforce_eager": "enforce_eager",
    "async_scheduling": "async_scheduling",
}


def json_object(text: str) -> dict:
    """An argparse type: a JSON object given on the command line."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `tierkv serve` command line (vLLM's flag names)."""
    p = _Parser(prog="tierkv serve", description="Serve a model over an OpenAI-compatible HTTP API.",
                argument_default=argparse.SUPPRESS)
    p.add_argument("model", nargs="?", help="HF directory or GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--model", dest="model_flag", metavar="MODEL", help="the model, as a flag (vLLM accepts both)")
    p.add_argument("--config", help="YAML or JSON file with any of these options; flags override it")
    server = p.add_argument_group("server")
    server.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    server.add_argument("--port", type=int, help="port to listen on (default 8000)")
    server.add_argument("--api-key", help="require `Authorization: Bearer <key>` on /v1 endpoints "
                                          f"(default: ${API_KEY_ENV_VARS[0]}, else ${API_KEY_ENV_VARS[1]})")
    server.add_argument("--served-model-name", nargs="+", help="model name(s) clients use (default: the model's name)")
    server.add_argument("--max-waiting-requests", type=int,
                        help="answer 503 once this many requests wait (default 4 x max-num-seqs)")
    server.add_argument("--max-request-body-bytes", type=int,
                        help="answer 413 to a larger request body, refused before it is read (default 16 MiB)")
    server.add_argument("--shutdown-timeout", type=float,
                        help="seconds in-flight requests get to finish after SIGTERM (default 10)")
    server.add_argument("--disable-log-stats", action=argparse.BooleanOptionalAction,
                        help="no periodic stats line (throughput, queue, KV usage, cache hit rates)")
    server.add_argument("--uvicorn-log-level", choices=["critical", "error", "warning", "info", "debug", "trace"])
    engine = p.add_argument_group("engine")
    engine.add_argument("--max-model-len", type=int, help="longest prompt + output (default: the model's)")
    engine.add_argument("--max-num-seqs", type=int, help="most sequences in one step")
    engine.add_argument("--max-num-batched-tokens", type=int, help="token budget of one step")
    engine.add_argument("--long-prefill-token-threshold", type=int,
                        help="most tokens a prefill computes in one step, so running decodes are not "
                             "stalled by a long prompt (default 0: off)")
    engine.add_argument("--block-size", type=int, help="tokens per KV-cache block")
    engine.add_argument("--dtype", help="auto, bfloat16, float16 or float32")
    engine.add_argument("--seed", type=int, help="seed of the engine's RNG for unseeded requests")
    engine.add_argument("--gpu-memory-utilization", type=float, help="fraction of GPU memory to use")
    engine.add_argument("--kv-cache-dtype", help="KV-cache dtype (auto = the model dtype)")
    engine.add_argument("--kv-transfer-config", type=json_object, help="offloading connector config, JSON")
    engine.add_argument("--num-gpu-blocks-override", type=int, help="KV-cache blocks (skips sizing)")
    engine.add_argument("--kv-cache-memory-bytes", type=int, help="KV-cache size on CPU")
    engine.add_argument("--device", help="auto, cpu or cuda")
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction)
    engine.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, help="no CUDA graphs")
    engine.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction)
    return p


def parse_serve_args(argv: list[str]) -> ServeConfig:
    """Parse `tierkv serve` arguments (and the `--config` file they name) into a ServeConfig."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    if "config" in args:
        file_values = load_config_file(Path(args["config"]))
        file_model = file_values.pop("model", None)
        args = vars(parser.parse_args(_as_flags(file_values, parser) + argv))
        if file_model is not None and "model_flag" not in args:
            args.setdefault("model", file_model)
    return _serve_config(args)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML or JSON (a YAML subset) mapping of option names to values."""
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values, "
                          f"got {type(values).__name__}")
    return {str(key).replace("_", "-"): value for key, value in values.items()}


def _as_flags(values: dict[str, Any], parser: argparse.ArgumentParser) -> list[str]:
    """Turn config-file entries into flags, so they are checked exactly as flags are."""
    actions = {opt: a for a in parser._actions for opt in a.option_strings}
    tokens: list[str] = []
    for key, value in values.items():
        action = actions.get(f"--{key}")
        if action is None or key == "config":
            known = sorted(o[2:] for o in actions if o.startswith("--") and not o.startswith("--no-")
                           and o not in ("--help", "--config", "--model"))
            raise ConfigError(f"unknown config key '{key}'; known keys: model, {', '.join(known)}")
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
            tokens.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, list):
            tokens += [f"--{key}", *(str(v) for v in value)]
        elif isinstance(value, dict):
            tokens += [f"--{key}", json.dumps(value)]
        else:
            tokens += [f"--{key}", str(value)]
    return tokens


def resolve_api_key(flag: str | None, environ: Mapping[str, str]) -> str | None:
    """The API key: the flag's, else the first of `API_KEY_ENV_VARS` set; empty counts as unset, as in vLLM."""
    if flag:
        return flag
    for name in API_KEY_ENV_VARS:
        if environ.get(name):
            logger.info("API key from $%s: /v1 routes need `Authorization: Bearer <key>`", name)
            return environ[name]
    return None


def _serve_config(args: dict[str, Any]) -> ServeConfig:
    from engine.server.model_arg import pick_model   # here: model_arg imports this module's ConfigError

    model = pick_model(args.get("model"), args.get("model_flag"))
    engine_kwargs = {field: args[flag] for flag, field in _ENGINE_FLAGS.items() if flag in args}
    names = tuple(args.get("served_model_name", ()))
    try:
        engine = EngineConfig(model=model, served_model_name=names[0] if names else None,
                              max_waiting_requests=args.get("max_waiting_requests"), usage_context="server",
                              **engine_kwargs)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    port = args.get("port", 8000)
    if not 0 <= port <= 65535:
        raise ConfigError(f"port must be in [0, 65535], got {port}")
    max_body = args.get("max_request_body_bytes", ServeConfig.max_request_body_bytes)
    if max_body < 1:
        raise ConfigError(f"max-request-body-bytes must be >= 1, got {max_body}")
    shutdown_timeout = args.get("shutdown_timeout", 10.0)
    if shutdown_timeout < 0:
        raise ConfigError(f"shutdown-timeout must be >= 0 seconds, got {shutdown_timeout}")
    return ServeConfig(
        engine=engine,
        host=args.get("host", "0.0.0.0"),
        port=port,
        api_key=resolve_api_key(args.get("api_key"), os.environ),
        served_model_names=names,
        max_waiting_requests=engine.max_waiting_requests,
        max_request_body_bytes=max_body,
        shutdown_timeout=shutdown_timeout,
        log_level=args.get("uvicorn_log_level", "info"),
        log_stats=not args.get("disable_log_stats", False),
    )
