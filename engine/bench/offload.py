"""Offload at PCIe speed: TTFT cold vs a prefix hit from each tier, save and load rates against the
plain copies of the same bytes, and decode inter-token latency with saving on vs off and with a load
in flight.

One engine (`--model`, or `--arch` random weights as in the other benches; default the embedded
SmolLM2) with an embedded store of every tier asked for: memory always; Redis and S3 from URLs, or
started here with --start-redis / --start-moto. Before any measurement, a prompt as long as the
longest measured one is served with offload off (the first long prefill of a process pays one-time
costs), then once through each tier (the first save and load pay theirs: pinned rings, connections).

Rows: for every tier and every `--prompt-lens` length (`--repeats` times, each with fresh random
prompts), the prompt is served cold, its blocks saved to that tier only; the GPU prefix cache is
emptied and the prompt served again, its prefix now loaded from that tier alone. Each row sets

- save GB/s: bytes saved over the connector's save time (`tierkv_offload_saved_bytes` over
  `tierkv_offload_save_seconds_sum`, from the save being issued to the bytes being in the store)
  during the cold request, against a plain pinned device-to-host copy of the same bytes;
- load GB/s: bytes loaded over the load time (`tierkv_offload_loaded_bytes` over
  `tierkv_offload_load_seconds_sum`, from load start to pages ready) during the hit, against a plain
  pinned host-to-device copy of the same bytes.

Both copies are measured in the same run, right after the request (on CPU both are host memcpy).
With --repeats N > 1 the table shows medians and the JSON every run and min/median/max bands.

Decode: `--decode-requests` concurrent decodes, alternately with the policy saving their blocks and
refusing them (no lookup, no save); mean and p99 inter-token latencies, on over off. Load in flight:
the same decodes, once plain and once with a prompt of the longest length loaded from the memory tier
while they run; the p99 gap of the steps the load spans over the p99 of the plain run's decode.
The per-request choices go through a policy class, `engine.bench.offload:TiersFromMetadata`, which
reads them from the request's metadata.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import torch

from engine.bench import common, services
from engine.bench.raw_tiers import raw_get_gb_per_s
from engine.bench.trace import profiled
from engine.connector.policy import Decision, RequestInfo
from engine.models.config import load_model_config, resolve_model_path
from engine.sampling.params import SamplingParams
from kvstore.config import parse_bytes

_FLUSH_S = 300.0


class TiersFromMetadata:
    """Offload unless the caller's metadata says `"offload": false`; write through `metadata["tiers"]`."""

    def on_new_request(self, info: RequestInfo) -> Decision:
        offload = info.metadata.get("offload", True)
        return Decision(load=offload, save=offload, tiers=info.metadata.get("tiers"))


@dataclass
class TierRun:
    """One repetition of one row: a prompt served cold (saved to `tier`), then as a hit from `tier`."""

    tier: str
    prompt_tokens: int
    cold_ttft_s: float
    hit_ttft_s: float
    saved_bytes: int
    save_s: float                # Σ save time of the cold request's saves
    dropped_saves: int           # blocks the save queue refused (then the hit is partial)
    d2h_copy_gb_per_s: float | None
    hit_tokens: int              # tokens the lookup found in this tier
    loaded_tokens: int
    loaded_bytes: int
    load_s: float
    h2d_copy_gb_per_s: float | None
    raw_gb_per_s: float | None = None   # the tier's bare client reading the same bytes (Redis, S3)

    @property
    def hit_over_cold(self) -> float:
        return self.hit_ttft_s / self.cold_ttft_s

    @property
    def save_gb_per_s(self) -> float | None:
        return self.saved_bytes / self.save_s / 1e9 if self.save_s else None

    @property
    def load_gb_per_s(self) -> float | None:
        return self.loaded_bytes / self.load_s / 1e9 if self.load_s else None

    @property
    def save_of_copy(self) -> float | None:
        return _fraction(self.save_gb_per_s, self.d2h_copy_gb_per_s)

    @property
    def load_of_copy(self) -> float | None:
        return _fraction(self.load_gb_per_s, self.h2d_copy_gb_per_s)

    @property
    def load_of_raw(self) -> float | None:
        return _fraction(self.load_gb_per_s, self.raw_gb_per_s)

    def to_dict(self) -> dict:
        return asdict(self) | {name: getattr(self, name) for name in _DERIVED}


_DERIVED = ("hit_over_cold", "save_gb_per_s", "load_gb_per_s", "save_of_copy", "load_of_copy", "load_of_raw")
_MEDIANS = ("cold_ttft_s", "hit_ttft_s", "d2h_copy_gb_per_s", "h2d_copy_gb_per_s", "raw_gb_per_s") + _DERIVED


@dataclass
class DecodeResult:
    saving: str
    requests: int
    itl_samples: int
    itl_mean_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    saved_blocks: int


def _fraction(part: float | None, whole: float | None) -> float | None:
    return part / whole if part is not None and whole else None


# --- arguments ------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-lens", "--prompt-len", dest="prompt_lens", default="4096",
                   help="comma-separated prompt lengths of the TTFT rows (each below the model's max positions)")
    p.add_argument("--offload-block-size", type=int, default=256, help="tokens per offloaded block")
    p.add_argument("--cpu-bytes", default="4GiB", help="memory tier budget (must hold the longest prompt)")
    p.add_argument("--load-cost-model", action="store_true",
                   help="let the load-or-recompute model skip tiers slower than prefill (off: every row measures "
                        "its tier's data path)")
    p.add_argument("--kvstore-url", help="measure the memory tier of a kvstore daemon at this URL (grpc://host:port) "
                                         "instead of an embedded store; on this host, through its slab")
    p.add_argument("--start-kvstore", action="store_true",
                   help="start a kvstore daemon on this host for the run (memory tier: a --cpu-bytes slab whose "
                        "slots hold one block) and measure it, as --kvstore-url would")
    p.add_argument("--peer-engine", action="store_true",
                   help="with a daemon: also serve each prompt, saved by this engine, as a hit in a second engine "
                        "process on this host (on CUDA both must fit: --gpu-memory-utilization 0.45 at most)")
    p.add_argument("--max-pending-saves", type=int, default=None,
                   help="staged save blocks (default: enough for the longest prompt and the decodes)")
    p.add_argument("--redis-url", help="measure a Redis tier at this URL")
    p.add_argument("--start-redis", action="store_true", help="start a private redis-server for the Redis tier")
    p.add_argument("--s3-endpoint", help="host:port of an S3 endpoint (http) for the S3 tier")
    p.add_argument("--s3-bucket", default="tierkv-bench", help="bucket of the S3 tier (created if missing)")
    p.add_argument("--s3-access-key", default="bench-access-key")
    p.add_argument("--s3-secret-key", default="bench-secret-key")
    p.add_argument("--start-moto", action="store_true", help="start moto's S3 server here for the S3 tier")
    p.add_argument("--repeats", type=int, default=1,
                   help="repetitions of every TTFT row, decode run and load-in-flight run (bands when > 1)")
    p.add_argument("--decode-requests", type=int, default=None,
                   help="concurrent decodes (default: 64 on CUDA, 8 on CPU)")
    p.add_argument("--decode-prompt-len", type=int, default=224,
                   help="prompt tokens of the first decode; the others +8, +16, +24 (just under a block, "
                        "so saves land mid-decode)")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per decode")
    p.add_argument("--no-load-in-flight", action="store_true", help="skip the decode-with-a-load-in-flight part")
    p.add_argument("--trace-dir", help="after the measurements, serve one more hit of each row and one more load "
                                       "in flight under the torch profiler; keep their traces and op tables here")
    common.add_model_arguments(p, default_model="the embedded SmolLM2-135M")


def _prompt_lens(text: str) -> list[int]:
    try:
        lens = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"tierkv bench offload: --prompt-lens must be comma-separated integers, got {text!r}")
    if not lens:
        raise SystemExit("tierkv bench offload: --prompt-lens is empty")
    return lens


def _check_args(args: argparse.Namespace, device: torch.device, raw_config: dict) -> None:
    """Fill the device-dependent defaults and refuse what cannot be measured."""
    if args.decode_requests is None:
        args.decode_requests = 64 if device.type == "cuda" else 8
    for name in ("repeats", "decode_requests", "decode_prompt_len", "offload_block_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"tierkv bench offload: --{name.replace('_', '-')} must be at least 1")
    if args.peer_engine and not (args.kvstore_url or args.start_kvstore):
        raise SystemExit("tierkv bench offload: --peer-engine shares a daemon's slab: give --start-kvstore or "
                         "--kvstore-url")
    if args.peer_engine and device.type == "cuda" and (args.gpu_memory_utilization or 0.9) > 0.45:
        raise SystemExit("tierkv bench offload: --peer-engine runs two engines on the GPU: give "
                         "--gpu-memory-utilization 0.45 or less")
    if args.decode_tokens < 2:
        raise SystemExit("tierkv bench offload: --decode-tokens must be at least 2 (one gap)")
    short = [n for n in args.prompt_lens if n <= args.offload_block_size]
    if short:
        raise SystemExit(f"tierkv bench offload: prompt length {short[0]} holds no whole block to load beyond "
                         f"the last token; use more than --offload-block-size {args.offload_block_size}")
    limit = raw_config.get("max_position_embeddings")
    if limit and _max_model_len(args) > limit:
        raise SystemExit(f"tierkv bench offload: the model has max_position_embeddings {limit}, and a prompt "
                         f"must leave room for one generated token: the longest prompt is {limit - 1} "
                         f"(decodes need {_decode_len(args)})")


def _decode_len(args: argparse.Namespace) -> int:
    return args.decode_prompt_len + 24 + args.decode_tokens


def _max_model_len(args: argparse.Namespace) -> int:
    return max(max(args.prompt_lens) + 1, _decode_len(args))


# --- run ------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    args.prompt_lens = _prompt_lens(args.prompt_lens)
    if args.model is None and args.arch is None:
        args.model = resolve_model_path(None)  # the embedded SmolLM2: seconds on CPU
    device = common.bench_device(args)
    dtype = common.bench_dtype(args, device)
    with ExitStack() as stack:
        path, raw_config, random_weights = stack.enter_context(common.model_source(args))
        _check_args(args, device, raw_config)
        args.kvstore_url = _kvstore_url(args, stack, path, dtype)
        tiers = [] if args.kvstore_url else _secondary_tiers(args, stack)
        from engine.llm import LLM

        llm_kwargs = _engine_kwargs(args, path, random_weights, dtype, tiers)
        _phase(f"engine: {common.model_label(args)}, {dtype}, max_model_len {_max_model_len(args)}")
        llm = LLM(**llm_kwargs)
        stack.callback(common.close_engine, llm)
        if not args.kvstore_url:
            _check_memory_tier(llm, args)
        rng = random.Random(args.seed)
        names = ["memory"] + [t["type"] for t in tiers]
        args.tier_configs = {t["type"]: t for t in tiers}
        _warm_up(llm, args, names, rng)
        rows = _tier_rows(llm, args, names, rng)
        if args.peer_engine:
            from engine.bench.offload_peer import peer_rows

            rows += peer_rows(llm, args, llm_kwargs, rng)
        decode = _decode_itl(llm, args, rng)
        in_flight = None if args.no_load_in_flight else _load_in_flight(llm, args, rng)
    result = {"config": _config(args, device, dtype, names), "ttft": rows, "decode": [asdict(r) for r in decode],
              "decode_on_over_off": _on_over_off(decode), "load_in_flight": in_flight}
    common.write_json(args.json, result)
    print(format_result(result))
    return 0


def _phase(text: str) -> None:
    print(f"[bench offload] {text}", file=sys.stderr, flush=True)


def _config(args: argparse.Namespace, device: torch.device, dtype: str, tiers: list[str]) -> dict:
    return {"model": common.model_label(args), "device": str(device), "dtype": dtype, "tiers": tiers,
            "prompt_lens": args.prompt_lens, "max_model_len": _max_model_len(args),
            "offload_block_size": args.offload_block_size,
            "cpu_bytes": args.cpu_bytes, "max_pending_saves": _max_pending_saves(args), "repeats": args.repeats,
            "decode_requests": args.decode_requests, "decode_prompt_len": args.decode_prompt_len,
            "decode_tokens": args.decode_tokens}


def _max_pending_saves(args: argparse.Namespace) -> int:
    """Save slots: every block of the longest prompt and one more (its saves must not be dropped, or
    the hit is partial), and a block per decode."""
    if args.max_pending_saves is not None:
        return args.max_pending_saves
    return max(max(args.prompt_lens) // args.offload_block_size + 1, args.decode_requests)


def _engine_kwargs(args: argparse.Namespace, path: str, random_weights: bool, dtype: str,
                   secondary_tiers: list[dict]) -> dict:
    """`LLM(**kwargs)` of the measured engine (and of the peer engine: plain JSON)."""
    store = ({"kvstore_url": args.kvstore_url} if args.kvstore_url
             else {"cpu_bytes_to_use": args.cpu_bytes, "secondary_tiers": secondary_tiers})
    cfg = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
           "kv_connector_extra_config": {
               "block_size": args.offload_block_size, **store, "max_pending_saves": _max_pending_saves(args),
               "load_cost_model": args.load_cost_model,
               "policy": {"class": "engine.bench.offload:TiersFromMetadata"}}}
    return common.engine_kwargs(args, path, random_weights, dtype, _max_model_len(args)) | {"kv_transfer_config": cfg}


def _block_bytes(llm, args: argparse.Namespace) -> int:
    core = llm.engine.core
    kv = core.runner.kv_cache
    return args.offload_block_size // core.config.block_size * kv[0].numel() * kv.element_size()


def _check_memory_tier(llm, args: argparse.Namespace) -> None:
    """The longest prompt's blocks must fit the memory tier, or its hit rows measure a partial load."""
    from engine.connector.config import parse_kv_transfer_config

    budget = parse_kv_transfer_config(llm.engine.core.config.kv_transfer_config).offload.cpu_bytes_to_use
    blocks = max(args.prompt_lens) // args.offload_block_size + 1
    needed = blocks * _block_bytes(llm, args)
    if budget < needed:
        raise SystemExit(f"tierkv bench offload: --cpu-bytes {args.cpu_bytes} cannot hold the longest prompt's "
                         f"{blocks} blocks of {_block_bytes(llm, args) / 2**20:.1f} MiB; pass at least "
                         f"--cpu-bytes {-(-2 * needed // 2**30)}GiB")


def _prompt(llm, rng: random.Random, n: int) -> list[int]:
    vocab = llm.engine.model_config.vocab_size
    return [rng.randrange(vocab) for _ in range(n)]


def _warm_up(llm, args: argparse.Namespace, tiers: list[str], rng: random.Random) -> None:
    """One-time costs out of the measurements: the first long prefill (offload off), the first save and
    load of each tier (the memory tier at the longest length), the first decode batch."""
    _phase("warm-up")
    longest = _prompt(llm, rng, max(args.prompt_lens))
    _ttft(llm, longest, {"offload": False})
    for tier in tiers:
        prompt = longest if tier == "memory" else _prompt(llm, rng, 2 * args.offload_block_size + 1)
        _tier_run(llm, args, tier, prompt)
    _one_decode_run(llm, args, rng, {"offload": False}, max_tokens=2)


# --- TTFT rows: cold, then a hit from one tier ----------------------------------------------------

def _tier_rows(llm, args: argparse.Namespace, tiers: list[str], rng: random.Random) -> list[dict]:
    """Every tier at every prompt length, `repeats` times (repetitions outermost, so drift spreads
    over the bands instead of landing on one row)."""
    runs: dict[tuple[str, int], list[TierRun]] = {}
    for rep in range(args.repeats):
        for n in args.prompt_lens:
            for tier in tiers:
                _phase(f"TTFT {tier}, {n} tokens, repeat {rep + 1}/{args.repeats}")
                runs.setdefault((tier, n), []).append(_tier_run(llm, args, tier, _prompt(llm, rng, n)))
    if args.trace_dir:
        for n in args.prompt_lens:
            for tier in tiers:
                _phase(f"profiled hit, {tier}, {n} tokens")
                _traced_hit(llm, args.trace_dir, tier, _prompt(llm, rng, n))
    return [_summary(row) for row in runs.values()]


def _traced_hit(llm, trace_dir: str, tier: str, prompt: list[int]) -> None:
    """One more cold run and hit of `prompt`, the hit under the profiler (not in the figures)."""
    _cold(llm, tier, prompt)
    llm.engine.core.kv.pool.reset_prefix_cache()
    with profiled(trace_dir, f"hit-{tier}-{len(prompt)}"):
        _hit(llm, tier, prompt)


def _tier_run(llm, args: argparse.Namespace, tier: str, prompt: list[int]) -> TierRun:
    """Cold TTFT (blocks saved to `tier` only), then TTFT with the prefix coming from `tier`; for a
    Redis or S3 tier, its bare client's rate reading the same bytes right after."""
    tier_configs = args.tier_configs
    cold_s, saved_bytes, save_s, dropped = _cold(llm, tier, prompt)
    llm.engine.core.kv.pool.reset_prefix_cache()
    d2h = _copy_gb_per_s(saved_bytes, llm.engine.core.device, to_device=False)
    hit_s, hit_tokens, loaded_tokens, loaded_bytes, load_s = _hit(llm, tier, prompt)
    h2d = _copy_gb_per_s(loaded_bytes, llm.engine.core.device, to_device=True)
    raw = None
    if tier in tier_configs and loaded_bytes:
        block_bytes = _block_bytes(llm, args)
        raw = raw_get_gb_per_s(tier_configs[tier], loaded_bytes // block_bytes, block_bytes)
    return TierRun(tier, len(prompt), cold_s, hit_s, saved_bytes, save_s, dropped, d2h, hit_tokens,
                   loaded_tokens, loaded_bytes, load_s, h2d, raw)


def _metrics(llm) -> dict[str, float]:
    return llm.engine.core.connector.metrics.snapshot()


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def _cold(llm, tier: str, prompt: list[int]) -> tuple[float, int, float, int]:
    """(TTFT, bytes saved, Σ save seconds, blocks dropped) of `prompt` served with nothing cached; its
    blocks stay in the GPU prefix cache."""
    core = llm.engine.core
    before = _metrics(llm)
    ttft = _ttft(llm, prompt, {"tiers": [tier]})
    core.connector.flush(_FLUSH_S)
    after = _metrics(llm)
    return (ttft, int(_delta(before, after, "tierkv_offload_saved_bytes")),
            _delta(before, after, "tierkv_offload_save_seconds_sum"),
            int(_delta(before, after, "tierkv_offload_dropped_saves")))


def _hit(llm, tier: str, prompt: list[int]) -> tuple[float, int, int, int, float]:
    """(TTFT, tokens found in `tier`, tokens loaded, bytes loaded, Σ load seconds) of `prompt` served
    again after the GPU prefix cache was emptied."""
    core = llm.engine.core
    before = _metrics(llm)
    ttft = _ttft(llm, prompt, {"tiers": [tier]})
    core.connector.flush(_FLUSH_S)  # the hit saves the prompt's last block: keep it out of what follows
    after = _metrics(llm)
    return (ttft, int(_delta(before, after, f"tierkv_offload_hit_tokens{{tier={tier}}}")),
            int(_delta(before, after, "tierkv_offload_loaded_tokens")),
            int(_delta(before, after, "tierkv_offload_loaded_bytes")),
            _delta(before, after, "tierkv_offload_load_seconds_sum"))


def _ttft(llm, prompt: list[int], metadata: dict) -> float:
    """Seconds from adding the request to its first token coming out of a step."""
    engine = llm.engine
    start = time.perf_counter()
    ttft = None
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0), metadata=metadata)
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if ttft is None and any(out.outputs[0].token_ids for out in outputs):
            ttft = time.perf_counter() - start
    return ttft


def _copy_gb_per_s(nbytes: int, device: torch.device, *, to_device: bool, repeats: int = 5) -> float | None:
    """The ceiling for moving `nbytes` between pinned host memory and the KV cache's device: best of
    `repeats` plain copies (host-to-device or device-to-host; host memcpy on CPU)."""
    if not nbytes:
        return None
    cuda = device.type == "cuda"
    # Both written first: on a CPU, a fresh allocation's pages all map the one zero page until
    # written, and a copy reading them runs at cache speed (twice a real memcpy here).
    host = torch.ones(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dev = torch.ones(nbytes, dtype=torch.uint8, device=device)
    src, dst = (host, dev) if to_device else (dev, host)
    best = float("inf")
    for _ in range(repeats):
        common.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=cuda)
        common.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def _summary(runs: list[TierRun]) -> dict:
    """One row: medians over the repetitions, min/median/max bands, and every run."""
    first = runs[0]
    row = {"tier": first.tier, "prompt_tokens": first.prompt_tokens,
           "hit_tokens": min(r.hit_tokens for r in runs), "loaded_tokens": min(r.loaded_tokens for r in runs),
           "dropped_saves": sum(r.dropped_saves for r in runs)}
    bands = {name: _band([getattr(r, name) for r in runs]) for name in _MEDIANS}
    row |= {name: band[1] if band else None for name, band in bands.items()}
    return row | {"bands": bands, "runs": [r.to_dict() for r in runs]}


def _band(values: list[float | None]) -> list[float] | None:
    present = [v for v in values if v is not None]
    return [min(present), statistics.median(present), max(present)] if present else None


# --- decode: saving on vs off ---------------------------------------------------------------------

def _decode_itl(llm, args: argparse.Namespace, rng: random.Random) -> list[DecodeResult]:
    samples: dict[str, list[float]] = {"off": [], "on": []}
    saved: dict[str, int] = {"off": 0, "on": 0}
    for rep in range(args.repeats):
        for mode in ("off", "on"):
            _phase(f"decode ITL, saving {mode}, repeat {rep + 1}/{args.repeats}")
            before = _metrics(llm)
            samples[mode] += _one_decode_run(llm, args, rng, {"offload": mode == "on"})
            llm.engine.core.connector.flush(_FLUSH_S)
            saved[mode] += int(_delta(before, _metrics(llm), "tierkv_offload_saved_blocks"))
    return [_decode_result(mode, args.decode_requests * args.repeats, samples[mode], saved[mode])
            for mode in ("off", "on")]


def _add_decodes(llm, args: argparse.Namespace, rng: random.Random, metadata: dict,
                 max_tokens: int | None = None) -> list[str]:
    """`decode_requests` decodes of prompts decode_prompt_len + 0, 8, 16, 24 tokens in turn: with the
    defaults each crosses the 256-token block boundary mid-decode, a quarter of them at each of four
    steps, and is saved then (when saving)."""
    params = SamplingParams(max_tokens=max_tokens or args.decode_tokens, temperature=0.0, ignore_eos=True)
    return [llm.engine.add_request(_prompt(llm, rng, args.decode_prompt_len + 8 * (i % 4)), params,
                                   metadata=metadata)
            for i in range(args.decode_requests)]


def _one_decode_run(llm, args: argparse.Namespace, rng: random.Random, metadata: dict,
                    max_tokens: int | None = None) -> list[float]:
    """Inter-token gaps of `decode_requests` concurrent decodes."""
    engine = llm.engine
    clock = _GapClock(_add_decodes(llm, args, rng, metadata, max_tokens))
    while engine.has_unfinished_requests():
        clock.record(engine.step())
    return clock.gaps


class _GapClock:
    """Gaps between the tokens of the requests it follows, as the engine's steps return them."""

    def __init__(self, request_ids: list[str]) -> None:
        self.last: dict[str, float] = {rid: 0.0 for rid in request_ids}
        self.gaps: list[float] = []

    @property
    def all_started(self) -> bool:
        return all(self.last.values())

    def record(self, outputs) -> list[float]:
        """Note this step's tokens; return the gaps it added."""
        now = time.perf_counter()
        added = []
        for out in outputs:
            if out.request_id not in self.last:
                continue
            if self.last[out.request_id]:
                added.append(now - self.last[out.request_id])
            self.last[out.request_id] = now
        self.gaps += added
        return added


def _decode_result(mode: str, requests: int, gaps: list[float], saved: int) -> DecodeResult:
    ms = [g * 1e3 for g in gaps]
    return DecodeResult(mode, requests, len(ms), statistics.fmean(ms), common.percentile(ms, 50),
                        common.percentile(ms, 99), saved)


def _on_over_off(decode: list[DecodeResult]) -> dict:
    off, on = decode
    return {"itl_mean": on.itl_mean_ms / off.itl_mean_ms, "itl_p99": on.itl_p99_ms / off.itl_p99_ms}


# --- decode with a load in flight -----------------------------------------------------------------

def _load_in_flight(llm, args: argparse.Namespace, rng: random.Random) -> dict:
    """Decode ITL p99 while the blocks of a prompt of the longest length are loaded from the memory
    tier, over the p99 of the same decodes without it (decodes offload off). The loaded prompt is one
    token past its whole blocks, so the step that copies them into pages computes just that token.
    Each window's steps are kept too (their longest gap, and which step returned the loaded
    request's token), to see which step sets the p99."""
    without: list[float] = []
    during: list[float] = []
    windows: list[list[dict]] = []
    loaded = 0
    for rep in range(args.repeats):
        _phase(f"decode ITL with a load in flight, repeat {rep + 1}/{args.repeats}")
        without += _steady_gaps(llm, args, rng)
        prompt = _stored_prompt(llm, rng, _in_flight_len(args))
        before = _metrics(llm)
        window = _gaps_while_loading(llm, args, rng, prompt)
        during += [gap for step in window for gap in step["gaps"]]
        windows.append([{"max_gap_ms": max(step["gaps"], default=0.0) * 1e3, "loaded_token": step["loaded_token"]}
                        for step in window])
        loaded += int(_delta(before, _metrics(llm), "tierkv_offload_loaded_tokens"))
    if args.trace_dir:
        _phase("profiled decode with a load in flight")
        prompt = _stored_prompt(llm, rng, _in_flight_len(args))
        with profiled(args.trace_dir, "load-in-flight"):
            _gaps_while_loading(llm, args, rng, prompt)
    p99_without = common.percentile(without, 99) * 1e3
    p99_during = common.percentile(during, 99) * 1e3 if during else None
    return {"prompt_tokens": _in_flight_len(args), "loaded_tokens": loaded,
            "window_steps": sum(len(w) for w in windows), "windows": windows,
            "gaps_without": len(without), "gaps_during": len(during),
            "itl_mean_ms_without": statistics.fmean(without) * 1e3,
            "itl_mean_ms_during": statistics.fmean(during) * 1e3 if during else None,
            "itl_p99_ms_without": p99_without, "itl_p99_ms_during": p99_during,
            "p99_ratio": _fraction(p99_during, p99_without)}


def _in_flight_len(args: argparse.Namespace) -> int:
    """The longest prompt's whole blocks below its last token (what its hit loads), plus one token."""
    block = args.offload_block_size
    return (max(args.prompt_lens) - 1) // block * block + 1


def _stored_prompt(llm, rng: random.Random, n: int) -> list[int]:
    """A fresh prompt whose blocks are in the memory tier and not in the GPU prefix cache."""
    prompt = _prompt(llm, rng, n)
    _cold(llm, "memory", prompt)
    llm.engine.core.kv.pool.reset_prefix_cache()
    return prompt


def _steady_gaps(llm, args: argparse.Namespace, rng: random.Random) -> list[float]:
    """The gaps of the decodes once every one of them has its first token."""
    engine = llm.engine
    clock = _GapClock(_add_decodes(llm, args, rng, {"offload": False}))
    steady: list[float] = []
    while engine.has_unfinished_requests():
        started = clock.all_started
        gaps = clock.record(engine.step())
        if started:
            steady += gaps
    return steady


def _gaps_while_loading(llm, args: argparse.Namespace, rng: random.Random, prompt: list[int]) -> list[dict]:
    """Once every decode has its first token, `prompt` is added (its prefix in the memory tier); for
    each step from then until its load has finished, the decodes' gaps and whether it returned the
    loaded request's token. The decodes run until then however long the load takes, and are aborted
    after."""
    engine = llm.engine
    connector = engine.core.connector
    ids = _add_decodes(llm, args, rng, {"offload": False}, max_tokens=engine.core.max_model_len)
    clock = _GapClock(ids)
    while not clock.all_started and engine.has_unfinished_requests():
        clock.record(engine.step())
    load_id = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0),
                                 metadata={"tiers": ["memory"]})
    window: list[dict] = []
    seen_pending, loading = False, True
    while loading and engine.has_unfinished_requests():
        outputs = engine.step()
        returned = any(out.request_id == load_id for out in outputs)
        window.append({"gaps": clock.record(outputs), "loaded_token": returned})
        pending = connector.has_pending_loads
        seen_pending |= pending
        loading = not ((seen_pending and not pending) or returned)
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return window


# --- output ---------------------------------------------------------------------------------------

def format_result(r: dict) -> str:
    c = r["config"]
    banded = c["repeats"] > 1
    lines = [f"offload: {c['model']}, {c['dtype']} on {c['device']}, {c['offload_block_size']}-token blocks"
             + (f", medians of {c['repeats']} repeats [min-max]" if banded else ""),
             common.table(["tier", "prompt", "cold s", "hit s", "hit/cold", "load GB/s", "H2D copy GB/s", "of copy",
                           "raw GB/s", "of raw", "save GB/s", "D2H copy GB/s", "of copy"],
                          [_table_row(row, banded) for row in r["ttft"]])]
    lines += _decode_lines(r)
    return "\n".join(lines)


def _table_row(row: dict, banded: bool) -> list:
    def cell(name: str, percent: bool = False):
        band = row["bands"][name]
        if band is None:
            return None
        show = common.percent if percent else _number
        return f"{show(band[1])} [{show(band[0])}-{show(band[2])}]" if banded else show(band[1])

    return [row["tier"], row["prompt_tokens"], row["cold_ttft_s"], row["hit_ttft_s"], cell("hit_over_cold"),
            cell("load_gb_per_s"), row["h2d_copy_gb_per_s"], cell("load_of_copy", True), cell("raw_gb_per_s"),
            cell("load_of_raw", True), cell("save_gb_per_s"),
            row["d2h_copy_gb_per_s"], cell("save_of_copy", True)]


def _number(value: float) -> str:
    return f"{value:.3g}"


def _decode_lines(r: dict) -> list[str]:
    c = r["config"]
    off, on = r["decode"]
    ratio = r["decode_on_over_off"]
    lines = [f"decode ITL, {c['decode_requests']} concurrent decodes of {c['decode_tokens']} tokens: "
             f"saving off mean {off['itl_mean_ms']:.3g} ms p99 {off['itl_p99_ms']:.3g} ms; "
             f"on mean {on['itl_mean_ms']:.3g} ms p99 {on['itl_p99_ms']:.3g} ms ({on['saved_blocks']} blocks saved); "
             f"on/off mean {ratio['itl_mean']:.3f}, p99 {ratio['itl_p99']:.3f}"]
    f = r["load_in_flight"]
    if f:
        during = "-" if f["itl_p99_ms_during"] is None else f"{f['itl_p99_ms_during']:.3g} ms"
        ratio = "-" if f["p99_ratio"] is None else f"{f['p99_ratio']:.3f}"
        lines.append(f"load in flight ({f['prompt_tokens']}-token prompt from memory, {f['window_steps']} steps): "
                     f"ITL p99 {f['itl_p99_ms_without']:.3g} ms without, {during} during; ratio {ratio}")
    return lines


# --- tiers: given by URL, or started here ---------------------------------------------------------

def _secondary_tiers(args: argparse.Namespace, stack: ExitStack) -> list[dict]:
    tiers = []
    redis_url = services.start_redis(stack) if args.start_redis else args.redis_url
    if redis_url:
        tiers.append({"type": "redis", "url": redis_url, "key_prefix": "tierkv-bench:"})
    endpoint = services.start_moto(stack) if args.start_moto else args.s3_endpoint
    if endpoint:
        services.ensure_bucket(endpoint, args.s3_bucket, args.s3_access_key, args.s3_secret_key)
        tiers.append({"type": "obj", "bucket": args.s3_bucket, "endpoint_override": endpoint, "scheme": "http",
                      "access_key": args.s3_access_key, "secret_key": args.s3_secret_key})
    return tiers


def _kvstore_url(args: argparse.Namespace, stack: ExitStack, path: str, dtype: str) -> str | None:
    """--kvstore-url, or the URL of a daemon started here whose slab slots hold this engine's blocks."""
    if not args.start_kvstore:
        return args.kvstore_url
    cfg = load_model_config(path, dtype, load_format="dummy")
    slot = args.offload_block_size * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * cfg.dtype.itemsize
    return services.start_kvstore(stack, parse_bytes(args.cpu_bytes), slot)
