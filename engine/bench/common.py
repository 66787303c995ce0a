"""What the engine benchmarks share: model source (a real model or a named shape with random weights),
engine arguments, random token prompts, percentiles and the plain-text table."""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from engine.models.config import resolve_model_path
from engine.models.gguf_metadata import gguf_hf_config, read_gguf_header

# Exact HF config values of the public checkpoints (Qwen/Qwen3-0.6B, meta-llama/Meta-Llama-3-8B);
# tiny-llama is a test shape that runs in seconds on CPU.
ARCHS: dict[str, dict] = {
    "qwen3-0.6b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=3072,
        vocab_size=151936, rope_theta=1000000, rope_scaling=None, rms_norm_eps=1e-6,
        max_position_embeddings=40960, tie_word_embeddings=True, attention_bias=False,
        use_sliding_window=False, sliding_window=None, hidden_act="silu",
        bos_token_id=151643, eos_token_id=151645),
    "llama-3-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336,
        vocab_size=128256, rope_theta=500000.0, rope_scaling=None, rms_norm_eps=1e-5,
        max_position_embeddings=8192, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        hidden_act="silu", bos_token_id=128000, eos_token_id=128001),
    "tiny-llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        vocab_size=512, rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6,
        max_position_embeddings=2048, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        hidden_act="silu", bos_token_id=0, eos_token_id=1),
}


def add_model_arguments(p: argparse.ArgumentParser, default_model: str = "qwen3-0.6b") -> None:
    """Flags every engine benchmark takes: the model and the engine settings. `default_model` only
    words the help: what the benchmark serves when neither --model nor --arch is given."""
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="HF directory or GGUF file (real weights)")
    source.add_argument("--arch", choices=sorted(ARCHS),
                        help=f"random weights of this model shape (default: {default_model} when --model is not given)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: the engine's for this device")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the engine's for this device")
    p.add_argument("--long-prefill-token-threshold", type=int, default=None,
                   help="most tokens a prefill computes per step (default: the engine's, 0 = off)")
    p.add_argument("--block-size", type=int, default=None, help="default: the engine's")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="default: the engine's")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--no-async-scheduling", action="store_true", help="schedule step N+1 only after step N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="skip the HF transformers baseline")
    p.add_argument("--bandwidth-bytes", type=int, default=1 << 30,
                   help="bytes copied to measure memory bandwidth (default 1 GiB)")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="square matmul size for peak FLOP/s (default 8192 on CUDA, 1024 on CPU)")
    p.add_argument("--json", help="also write every number to this JSON file")


def bench_device(args: argparse.Namespace) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tierkv bench: --device cuda was asked for but no CUDA device is available")
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def bench_dtype(args: argparse.Namespace, device: torch.device) -> str:
    return args.dtype or ("bfloat16" if device.type == "cuda" else "float32")


def model_label(args: argparse.Namespace) -> str:
    return args.model if args.model else f"{args.arch or 'qwen3-0.6b'} (random weights)"


@contextmanager
def model_source(args: argparse.Namespace) -> Iterator[tuple[str, dict, bool]]:
    """Yield (model path, HF config dict, random weights?) for --model or --arch.

    A named shape is written as a config.json into a temporary directory, which the engine then
    loads with random weights (load_format="dummy").
    """
    if args.model:
        path = resolve_model_path(args.model)
        yield path, hf_config_dict(path), False
        return
    raw = ARCHS[args.arch or "qwen3-0.6b"]
    with tempfile.TemporaryDirectory(prefix="tierkv-bench-model-") as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(raw, f)
        yield tmp, dict(raw), True


def hf_config_dict(path: str) -> dict:
    """The HF config of a model directory or GGUF file, as a dict."""
    if path.endswith(".gguf"):
        return gguf_hf_config(read_gguf_header(path))
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def engine_kwargs(args: argparse.Namespace, path: str, random_weights: bool, dtype: str, max_model_len: int,
                  *, async_scheduling: bool | None = None, enforce_eager: bool | None = None) -> dict:
    """`LLM(**kwargs)` for a benchmark: token-id prompts only, flags mapped onto EngineConfig."""
    kwargs = dict(model=path, dtype=dtype, device=args.device, max_model_len=max_model_len, seed=args.seed,
                  skip_tokenizer_init=True,
                  async_scheduling=not args.no_async_scheduling if async_scheduling is None else async_scheduling,
                  enforce_eager=args.enforce_eager if enforce_eager is None else enforce_eager)
    if random_weights:
        kwargs["load_format"] = "dummy"
    for flag in ("max_num_seqs", "max_num_batched_tokens", "long_prefill_token_threshold", "block_size",
                 "gpu_memory_utilization"):
        if getattr(args, flag) is not None:
            kwargs[flag] = getattr(args, flag)
    return kwargs


def random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`n` prompts of `length` token ids drawn uniformly from the vocabulary."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(length)] for _ in range(n)]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Give cached device memory back, so that the next engine's KV pool sizing sees it free."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def close_engine(llm) -> None:
    close = getattr(llm.engine.core, "close", None)
    if close is not None:
        close()


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned table: first column left, the rest right; floats with 2-4 significant places."""
    cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 1000:
            return f"{value:.0f}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=1, default=str)
