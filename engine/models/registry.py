"""Which architectures the engine serves, how each is built, and why anything else is refused."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from engine.models.config import ModelConfig
    from engine.models.llama import CausalLM


class UnsupportedModelError(ValueError):
    """The model's config asks for a feature the engine cannot serve; the message names the feature."""


def _build_llama_family(cfg: "ModelConfig") -> "CausalLM":
    from engine.models.llama import CausalLM

    return CausalLM(cfg)


# Llama, Mistral (without sliding window), Qwen2 and Qwen3 share one decoder; config flags pick
# q/k/v bias and q/k norm.
ARCHITECTURES: dict[str, Callable[["ModelConfig"], "CausalLM"]] = {
    "LlamaForCausalLM": _build_llama_family,
    "MistralForCausalLM": _build_llama_family,
    "Qwen2ForCausalLM": _build_llama_family,
    "Qwen3ForCausalLM": _build_llama_family,
}
# config.json `model_type` (and GGUF `general.architecture`, as transformers names it) -> architecture
GGUF_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_MODEL_TYPE_OF = {arch: model_type for model_type, arch in GGUF_MODEL_TYPES.items()}
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
_ROPE_TYPES = ("default", "llama3")
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def build_model(cfg: "ModelConfig") -> "CausalLM":
    """Construct the (uninitialised) module for `cfg.architecture`."""
    return ARCHITECTURES[cfg.architecture](cfg)


def check_mixture_of_experts(raw: dict) -> None:
    """Refuse MoE configs: the engine has no expert routing."""
    for key in _MOE_KEYS:
        if raw.get(key):
            raise UnsupportedModelError(
                f"mixture-of-experts models are not supported (config has {key}={raw[key]})")


def check_architecture(raw: dict) -> str:
    """Return the served architecture named by `raw` (setting its model_type when missing), or refuse."""
    archs = raw.get("architectures") or [GGUF_MODEL_TYPES.get(raw.get("model_type"), raw.get("model_type"))]
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported (supported architectures: {', '.join(ARCHITECTURES)})")
    raw.setdefault("model_type", _MODEL_TYPE_OF[arch])
    return arch


def check_sliding_window(hf) -> None:
    """Refuse sliding window attention (Qwen `use_sliding_window`, Mistral `sliding_window`)."""
    if getattr(hf, "use_sliding_window", None) is not None:
        if hf.use_sliding_window:
            raise UnsupportedModelError(
                f"sliding window attention is not supported (config has use_sliding_window=true, "
                f"sliding_window={getattr(hf, 'sliding_window', None)})")
        return
    window = getattr(hf, "sliding_window", None)
    if window is not None and window < hf.max_position_embeddings:
        raise UnsupportedModelError(
            f"sliding window attention is not supported (config has sliding_window={window} < "
            f"max_position_embeddings={hf.max_position_embeddings})")


def check_hidden_act(hf) -> None:
    """Refuse MLP activations other than SiLU (the gated MLP kernel is silu_and_mul)."""
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"MLP activation hidden_act={act!r} is not supported (only 'silu')")


def check_rope(hf) -> tuple[float, dict | None]:
    """Return (rope_theta, rope_scaling) with rope_scaling None for plain RoPE; refuse other scalings.

    transformers 5 keeps theta and scaling in `rope_parameters`; 4.x in `rope_theta` and `rope_scaling`.
    """
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    theta = float(params.pop("rope_theta", getattr(hf, "rope_theta", None) or 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    partial = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None) or 1.0)
    if partial != 1.0:
        raise UnsupportedModelError(f"partial rotary embedding (partial_rotary_factor={partial}) is not supported")
    if rope_type == "default":
        return theta, None
    missing = [k for k in _LLAMA3_ROPE_KEYS if k not in params]
    if missing:
        raise UnsupportedModelError(f"llama3 rope scaling is missing {', '.join(missing)} in rope_scaling")
    return theta, {"rope_type": "llama3", **{k: params[k] for k in _LLAMA3_ROPE_KEYS}}
