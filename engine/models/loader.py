"""Load weights (HF safetensors or GGUF, dequantized) into a CausalLM, and the model's tokenizer."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from types import SimpleNamespace

import torch
from tqdm import tqdm

from engine.models import gguf_cache
from engine.models.config import ModelConfig, safetensors_files
from engine.models.gguf_metadata import read_gguf_header
from engine.models.llama import CausalLM
from engine.models.registry import build_model

logger = logging.getLogger(__name__)

# Checkpoint tensors that carry nothing we load: RoPE tables some exporters save (we compute ours).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def load_model(cfg: ModelConfig, device: torch.device) -> CausalLM:
    """Build the model for `cfg` on `device` in `cfg.dtype` and fill every parameter from the checkpoint.

    The module is built on the meta device and materialised uninitialised: every parameter is then
    written exactly once from the checkpoint, and a tensor missing or unexpected is an error.
    """
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to(dtype=cfg.dtype).to_empty(device=device)
    layout_names = list(model.checkpoint_layout())
    tensors = _gguf_tensors(cfg, layout_names) if cfg.is_gguf else _safetensors_tensors(cfg, cfg.path)
    _fill_parameters(model, tensors)
    model.build_rotary_cache()
    return model.eval()


def _fill_parameters(model: CausalLM, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    layout = model.checkpoint_layout()
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    with torch.no_grad():
        for name, tensor in tensors:
            if name not in layout:
                if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and model.lm_head is None):
                    continue
                raise ValueError(f"checkpoint tensor {name!r} has no place in {model.cfg.architecture} "
                                 f"with this config.json; is the config right for these weights?")
            param_name, rows = layout[name]
            target = params[param_name].data if rows is None else params[param_name].data[rows]
            if target.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"config expects {tuple(target.shape)}")
            target.copy_(tensor)
            loaded.add(name)
    missing = sorted(set(layout) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"checkpoint of {model.cfg.path!r} lacks {len(missing)} tensors: {shown}")


def _safetensors_tensors(cfg: ModelConfig, model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of every shard, one at a time (peak host memory: one tensor), with a progress bar."""
    from safetensors import safe_open

    files = safetensors_files(model_dir)
    total = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            total += len(f.keys())
    with tqdm(total=total, desc=f"Loading {cfg.name}", unit="tensor") as bar:
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
                    bar.update(1)


def _gguf_tensors(cfg: ModelConfig, hf_names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """GGUF tensors dequantized, renamed to HF names and un-permuted by transformers (its own progress
    bar) — once; later starts read the converted tensors from the GGUF cache."""
    what = f"weights-{str(cfg.dtype).removeprefix('torch.')}"
    cached = gguf_cache.lookup(cfg.revision, what)
    if cached is None:
        from safetensors.torch import save_file
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        model_type = read_gguf_header(cfg.path).metadata["general.architecture"]
        names = _HFNames(model_type, cfg.num_layers, hf_names)
        tensors = load_gguf_checkpoint(cfg.path, return_tensors=True, model_to_load=names,
                                       torch_dtype=cfg.dtype)["tensors"]
        cached = gguf_cache.store(cfg.revision, what, lambda d: save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors")))
        if cached is None:
            yield from tensors.items()
            return
    yield from _safetensors_tensors(cfg, str(cached))


class _HFNames:
    """The part of an HF model that transformers' GGUF renaming reads: config and state_dict names.

    Passing a real (meta) HF model instead makes transformers rebuild gguf's name table once per
    submodule — hundreds of times, tens of seconds for SmolLM2 — to find names the top level already has.
    """

    def __init__(self, model_type: str, num_layers: int, names: list[str]) -> None:
        self.config = SimpleNamespace(model_type=model_type, num_hidden_layers=num_layers)
        self._names = names

    def state_dict(self) -> dict[str, None]:
        return dict.fromkeys(self._names)

    def named_children(self) -> list:
        return []


def load_tokenizer(cfg: ModelConfig):
    """The model's HF tokenizer, with its chat template (from tokenizer files or GGUF metadata)."""
    from transformers import AutoTokenizer

    if cfg.is_gguf:
        cached = gguf_cache.lookup(cfg.revision, "tokenizer")
        if cached is not None:
            return AutoTokenizer.from_pretrained(str(cached))
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(cfg.path), gguf_file=os.path.basename(cfg.path))
        if tokenizer.chat_template is None:
            tokenizer.chat_template = read_gguf_header(cfg.path).metadata.get("tokenizer.chat_template")
        gguf_cache.store(cfg.revision, "tokenizer", lambda d: tokenizer.save_pretrained(str(d)))
    else:
        tokenizer = AutoTokenizer.from_pretrained(cfg.path)
    if tokenizer.chat_template is None:
        logger.warning("model %s has no chat template: chat requests will be refused", cfg.name)
    return tokenizer
