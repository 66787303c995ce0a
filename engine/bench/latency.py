"""Per-request latency: time to first token and inter-token latency at batch 1 and N, vs HF and the roofline.

For each batch size, that many random prompts are added at once through `LLMEngine.add_request` and
the engine is stepped until all finish; the time each step returns gives every request's first-token
time (TTFT, from submission) and the gaps between its tokens (ITL). The decode step time is the mean
step duration while every request of the batch gets a token each step (the median); the roofline decode step is
weights + live KV over the copy bandwidth measured in the same run (`engine.bench.roofline`).
In the same run: HF transformers at batch 1 and, with --gpu-busy, the fraction of wall time the GPU
is busy during steady decode at the largest batch (`engine.bench.gpu_busy`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from engine.bench import common, gpu_busy, hf_baseline, roofline
from engine.models.config import parse_dtype
from engine.sampling.params import SamplingParams


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", default="1,64,256", help="comma-separated batch sizes")
    p.add_argument("--input-len", type=int, default=512, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    p.add_argument("--gpu-busy", action="store_true",
                   help="measure GPU busy %% during steady decode at the largest batch (CUDA only)")
    p.add_argument("--busy-steps", type=int, default=100, help="engine steps profiled for GPU busy %%")
    p.add_argument("--compare-async", action="store_true",
                   help="GPU busy %% twice: async scheduling + CUDA graphs on, then both off")
    p.add_argument("--busy-trace-dir",
                   help="keep each GPU busy %% measurement's profiler trace here (busy-MODE.json.gz)")
    common.add_model_arguments(p)


def _batch_sizes(text: str, max_num_seqs: int | None) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"tierkv bench latency: --batch-sizes must be comma-separated integers, got {text!r}")
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"tierkv bench latency: --batch-sizes must be positive integers, got {text!r}")
    if max_num_seqs is not None and max(sizes) > max_num_seqs:
        raise SystemExit(f"tierkv bench latency: batch size {max(sizes)} is larger than max_num_seqs "
                         f"{max_num_seqs}; raise --max-num-seqs")
    return sizes


def run(args: argparse.Namespace) -> int:
    sizes = _batch_sizes(args.batch_sizes, args.max_num_seqs)
    for name in ("input_len", "output_len", "busy_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"tierkv bench latency: --{name.replace('_', '-')} must be at least 1")
    device = common.bench_device(args)
    dtype = common.bench_dtype(args, device)
    torch_dtype = parse_dtype(dtype, None)
    busy_wanted = args.gpu_busy or args.compare_async
    # Busy-% requests decode `busy_steps` (and the profiler's warm-up steps) past the batch's output
    # length: the window never runs into requests finishing.
    max_model_len = args.input_len + args.output_len + (_busy_tokens(args) if busy_wanted else 0)
    with common.model_source(args) as (path, raw_config, random_weights):
        _phase("measuring copy bandwidth and matmul peak")
        hw = roofline.measure_hardware(device, torch_dtype, args.bandwidth_bytes, args.matmul_size)
        hf = None
        if not args.no_baseline:
            _phase("HF transformers baseline at batch 1")
            hf = hf_baseline.latency(raw_config, device, torch_dtype, args.input_len, args.output_len, args.seed)
        from engine.llm import LLM

        first_modes = {"async_scheduling": True, "enforce_eager": False} if args.compare_async else {}
        llm = LLM(**common.engine_kwargs(args, path, random_weights, dtype, max_model_len, **first_modes))
        max_num_seqs = llm.engine.config.max_num_seqs
        long_prefill_token_threshold = llm.engine.config.long_prefill_token_threshold
        _batch_sizes(args.batch_sizes, max_num_seqs)
        cost = roofline.model_cost(llm.engine.core.runner.model, llm.engine.model_config)
        _warm_up(llm, args)
        batches = []
        for i, size in enumerate(sizes):
            _phase(f"engine at batch {size}")
            batches.append(_measure_batch(llm, size, args, args.seed + 10 + i, cost, hw))
        busy = []
        if busy_wanted and device.type != "cuda":
            _phase("GPU busy % needs CUDA: skipped")
        elif busy_wanted:
            label = "async+graphs" if args.compare_async else _mode_label(args)
            busy.append(_measure_busy(llm, max(sizes), args, label))
        common.close_engine(llm)
        del llm  # the last reference: the second engine sizes its KV pool from the memory freed here
        common.release_memory(device)
        if args.compare_async and device.type == "cuda":
            llm = LLM(**common.engine_kwargs(args, path, random_weights, dtype, max_model_len,
                                             async_scheduling=False, enforce_eager=True))
            _warm_up(llm, args)
            busy.append(_measure_busy(llm, max(sizes), args, "sync+eager"))
            common.close_engine(llm)
    result = {
        "config": {"model": common.model_label(args), "device": str(device), "dtype": dtype,
                   "input_len": args.input_len, "output_len": args.output_len, "batch_sizes": sizes,
                   "max_num_seqs": max_num_seqs, "long_prefill_token_threshold": long_prefill_token_threshold,
                   "mode": "async+graphs" if args.compare_async
                   else _mode_label(args)},
        "hardware": hw.to_dict(),
        "model_cost": cost.to_dict(),
        "batches": batches,
        "hf_batch1": hf.to_dict() if hf else None,
        "batch1_speedup_vs_hf": None,
        "gpu_busy": busy,
    }
    at_one = next((b for b in batches if b["batch_size"] == 1), None)
    if hf and at_one and at_one["decode_step_s"]:
        result["batch1_speedup_vs_hf"] = hf.per_token_s / at_one["decode_step_s"]
    common.write_json(args.json, result)
    print(format_result(result))
    return 0


def _phase(text: str) -> None:
    print(f"[bench latency] {text}", file=sys.stderr, flush=True)


def _mode_label(args: argparse.Namespace) -> str:
    return (f"{'sync' if args.no_async_scheduling else 'async'}+"
            f"{'eager' if args.enforce_eager else 'graphs'}")


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _warm_up(llm, args: argparse.Namespace) -> None:
    vocab = llm.engine.model_config.vocab_size
    prompts = common.random_prompts(2, args.input_len, vocab, args.seed + 1)
    llm.generate([{"prompt_token_ids": p} for p in prompts], _params(min(4, args.output_len)), use_tqdm=False)


class _TokenClock:
    """Arrival time of every request's tokens, from the outputs each engine step returns."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.seen: dict[str, int] = {}
        self.gaps: list[float] = []
        self.steps: list[tuple[float, int]] = []  # (time the step returned, tokens it produced)

    def record(self, outputs, now: float) -> None:
        produced = 0
        for out in outputs:
            rid, count = out.request_id, len(out.outputs[0].token_ids)
            new = count - self.seen.get(rid, 0)
            if new <= 0:
                continue
            self.seen[rid] = count
            produced += new
            if rid in self.first:
                self.gaps.extend([(now - self.last[rid]) / new] * new)
            else:
                self.first[rid] = now
            self.last[rid] = now
        self.steps.append((now, produced))


def _measure_batch(llm, size: int, args: argparse.Namespace, seed: int, cost, hw) -> dict:
    engine = llm.engine
    core = engine.core
    prompts = common.random_prompts(size, args.input_len, engine.model_config.vocab_size, seed)
    clock = _TokenClock()
    core.step_records = []
    common.synchronize(core.device)
    start = time.perf_counter()
    for p in prompts:
        engine.add_request({"prompt_token_ids": p}, _params(args.output_len))
    while engine.has_unfinished_requests():
        outputs = engine.step()
        clock.record(outputs, time.perf_counter())
    records, core.step_records = core.step_records, None
    ttft = [t - start for t in clock.first.values()]
    all_first = max(clock.first.values())
    # Steps after every request's first token in which each request got one: pure decode of the batch.
    full_steps = [t1 - t0 for (t0, _), (t1, n) in zip(clock.steps, clock.steps[1:]) if n == size and t0 >= all_first]
    decode = [r for r in records if r.num_tokens == r.num_seqs == size]
    # The median: the last step only collects the final tokens, which on CPU (no overlap) takes no time.
    step_s = statistics.median(full_steps) if full_steps else None
    roof_s = (statistics.fmean(roofline.step_seconds(cost, hw, r.num_tokens, r.num_seqs, r.context_tokens)
                               for r in decode) if decode else None)
    end = clock.steps[-1][0]
    steady_tokens = sum(n for t, n in clock.steps if t > all_first)
    return {
        "batch_size": size, "output_tokens": sum(clock.seen.values()), "elapsed_s": end - start,
        "ttft_p50_s": common.percentile(ttft, 50), "ttft_p99_s": common.percentile(ttft, 99),
        "itl_mean_s": statistics.fmean(clock.gaps) if clock.gaps else None,
        "itl_p50_s": common.percentile(clock.gaps, 50) if clock.gaps else None,
        "itl_p99_s": common.percentile(clock.gaps, 99) if clock.gaps else None,
        "decode_tok_s": steady_tokens / (end - all_first) if end > all_first else None,
        "decode_step_s": step_s, "decode_steps": len(full_steps),
        "roofline_step_s": roof_s,
        "roofline_fraction": roof_s / step_s if roof_s and step_s else None,
    }


def _busy_tokens(args: argparse.Namespace) -> int:
    return gpu_busy.WARMUP_STEPS + args.busy_steps


def _measure_busy(llm, size: int, args: argparse.Namespace, label: str) -> dict:
    """Add `size` requests, step until each has its first token, then profile `busy_steps` steps
    (after the profiler's warm-up steps)."""
    _phase(f"GPU busy % at batch {size} ({label})")
    engine = llm.engine
    prompts = common.random_prompts(size, args.input_len, engine.model_config.vocab_size, args.seed + 99)
    ids = [engine.add_request({"prompt_token_ids": p}, _params(args.output_len + _busy_tokens(args)))
           for p in prompts]
    clock = _TokenClock()
    while len(clock.first) < size:
        clock.record(engine.step(), time.perf_counter())
    trace_path = None
    if args.busy_trace_dir:
        os.makedirs(args.busy_trace_dir, exist_ok=True)
        trace_path = os.path.join(args.busy_trace_dir, f"busy-{label.replace('+', '-')}.json.gz")
    fraction, intervals = gpu_busy.measure(engine.step, args.busy_steps, trace_path=trace_path)
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return {"mode": label, "batch_size": size, "steps": args.busy_steps, "device_intervals": intervals,
            "busy_fraction": fraction, "trace": trace_path}


def format_result(r: dict) -> str:
    c = r["config"]
    ms = 1e3
    rows = []
    for b in r["batches"]:
        rows.append([f"tierkv batch {b['batch_size']}", _scaled(b["ttft_p50_s"], ms), _scaled(b["ttft_p99_s"], ms),
                     _scaled(b["itl_mean_s"], ms), _scaled(b["itl_p50_s"], ms), _scaled(b["itl_p99_s"], ms),
                     b["decode_tok_s"], _scaled(b["decode_step_s"], ms), _scaled(b["roofline_step_s"], ms),
                     common.percent(b["roofline_fraction"])])
    hf = r["hf_batch1"]
    if hf:
        rows.append(["HF transformers batch 1", _scaled(hf["ttft_s"], ms), None, _scaled(hf["per_token_s"], ms),
                     None, None, hf["decode_tok_s"], _scaled(hf["per_token_s"], ms), None, None])
    lines = [f"latency: {c['model']}, in {c['input_len']} / out {c['output_len']}, {c['dtype']} on {c['device']} "
             f"({c['mode']})",
             common.table(["", "TTFT p50 ms", "TTFT p99 ms", "ITL mean ms", "ITL p50 ms", "ITL p99 ms",
                           "decode tok/s", "step ms", "roofline ms", "of roofline"], rows)]
    if r["batch1_speedup_vs_hf"] is not None:
        lines.append(f"batch 1 decode step, ours vs HF per token: {r['batch1_speedup_vs_hf']:.3g}x faster")
    for busy in r["gpu_busy"]:
        lines.append(f"GPU busy % at batch {busy['batch_size']} ({busy['mode']}, {busy['steps']} steps): "
                     f"{common.percent(busy['busy_fraction'])}")
    return "\n".join(lines)


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor
