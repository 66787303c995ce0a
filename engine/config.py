"""Engine configuration: one typed object, validated once where it enters the engine."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

_DTYPES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16", "half", "float")
_KV_CACHE_DTYPES = ("auto",)
_DEVICES = ("auto", "cpu", "cuda")
_USAGE_CONTEXTS = ("llm", "server")
_GiB = 1 << 30


@dataclass
class EngineConfig:
    """Everything `LLM(...)`, `tierkv generate` and `tierkv serve` configure.

    `model=None` serves the embedded default model (SmolLM2-135M-Instruct). `load_format="dummy"`
    gives random weights from the model's config.json alone (benchmarks); `skip_tokenizer_init`
    serves token-id prompts only and returns no text. `num_gpu_blocks`
    overrides KV-pool sizing; otherwise the pool gets `kv_cache_memory_bytes` (CPU, default 2 GiB)
    or what `gpu_memory_utilization` leaves after a profiling forward (CUDA).
    """

    model: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int | None = None  # None: `batch_defaults` for the device and usage_context
    max_num_batched_tokens: int | None = None
    long_prefill_token_threshold: int = 0  # > 0: most tokens a prefill computes per step (vLLM's); 0: off
    block_size: int = 16
    num_gpu_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"
    seed: int = 0
    enable_prefix_caching: bool = True
    kv_transfer_config: dict | None = None
    device: str = "auto"
    served_model_name: str | None = None
    max_waiting_requests: int | None = None
    async_scheduling: bool = True
    enforce_eager: bool = False
    load_format: str = "auto"
    skip_tokenizer_init: bool = False
    usage_context: str = "llm"  # "llm" (offline, throughput first) or "server" (latency matters too)

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
                     "num_gpu_blocks", "kv_cache_memory_bytes", "max_waiting_requests"):
            positive(name)
        threshold = self.long_prefill_token_threshold
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be an integer >= 0 (0 = off), got {threshold!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in _KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(_KV_CACHE_DTYPES)} "
                             f"(the KV cache uses the model dtype), got {self.kv_cache_dtype!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy' (random weights), got {self.load_format!r}")
        if self.usage_context not in _USAGE_CONTEXTS:
            raise ValueError(f"usage_context must be one of {', '.join(_USAGE_CONTEXTS)}, got {self.usage_context!r}")
        if self.device not in _DEVICES:
            raise ValueError(f"device must be one of {', '.join(_DEVICES)}, got {self.device!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.kv_transfer_config is not None and not isinstance(self.kv_transfer_config, dict):
            raise ValueError("kv_transfer_config must be a JSON object (dict), "
                             f"got {type(self.kv_transfer_config).__name__}")
        if self.kv_transfer_config is not None:
            # Checked here, before any weights load: a typo must not cost a minute of loading first.
            from engine.connector.config import parse_kv_transfer_config

            parse_kv_transfer_config(self.kv_transfer_config)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """Build from keyword arguments, naming any argument the engine does not know."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}")
        return cls(**kwargs)


def batch_defaults(usage_context: str, device_type: str, device_memory: int = 0,
                   device_name: str = "") -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) when the user set neither; vLLM's defaults.

    GPUs of 70 GiB or more (H100, H200; not the A100, where large steps were measured to lose
    throughput) run up to 1024 sequences; offline use takes 16384-token steps, a server 8192 so
    that a long prompt's chunk does not stall every stream's next token for long. Smaller GPUs
    run 256 sequences with 8192/2048-token steps. The CPU keeps the small GPU's server values.
    """
    if device_type == "cuda" and device_memory >= 70 * _GiB and "a100" not in device_name.lower():
        return 1024, 16384 if usage_context == "llm" else 8192
    if device_type == "cuda":
        return 256, 8192 if usage_context == "llm" else 2048
    return 256, 2048


def with_batch_defaults(config: EngineConfig, device_type: str, device_memory: int = 0,
                        device_name: str = "") -> EngineConfig:
    """`config` with max_num_seqs and max_num_batched_tokens filled in where they were left None."""
    seqs, tokens = batch_defaults(config.usage_context, device_type, device_memory, device_name)
    return replace(config, max_num_seqs=config.max_num_seqs or seqs,
                   max_num_batched_tokens=config.max_num_batched_tokens or tokens)
