"""Offline throughput: prompts through the engine, tokens/s, vs HF transformers and the roofline.

All prompts (random token ids) are submitted at once through `LLM.generate`, greedy, `ignore_eos`,
exactly `--output-len` tokens each. In the same run: the device's copy bandwidth and matmul peak,
the HF transformers baseline (run first and freed, so the engine's KV pool gets that memory), and
the roofline: Σ over the engine's steps of max(bytes / bandwidth, FLOPs / peak), see
`engine.bench.roofline`.
"""

from __future__ import annotations

import argparse
import sys
import time

from engine.bench import common, hf_baseline, roofline
from engine.server.args import json_object
from engine.models.config import parse_dtype
from engine.sampling.params import SamplingParams


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=512, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per prompt")
    p.add_argument("--warmup-prompts", type=int, default=8, help="short untimed run before the timed one")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--hf-batches", type=int, default=1)
    p.add_argument("--kv-transfer-config", type=json_object,
                   help="offloading connector config, JSON (as tierkv serve takes it): the run's cost with a "
                        "policy that saves every prompt, say")
    common.add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    for name in ("num_prompts", "input_len", "output_len", "hf_batch_size", "hf_batches", "max_num_seqs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"tierkv bench throughput: --{name.replace('_', '-')} must be at least 1")
    device = common.bench_device(args)
    dtype = common.bench_dtype(args, device)
    torch_dtype = parse_dtype(dtype, None)
    with common.model_source(args) as (path, raw_config, random_weights):
        _phase("measuring copy bandwidth and matmul peak")
        hw = roofline.measure_hardware(device, torch_dtype, args.bandwidth_bytes, args.matmul_size)
        hf = None
        if not args.no_baseline:
            _phase(f"HF transformers baseline: {args.hf_batches} x batch {args.hf_batch_size}")
            hf = hf_baseline.throughput(raw_config, device, torch_dtype, args.hf_batch_size, args.hf_batches,
                                        args.input_len, args.output_len, args.seed)
        _phase(f"engine: {args.num_prompts} prompts")
        engine = _run_engine(args, path, random_weights, dtype)
    cost = engine.pop("cost")
    records = engine.pop("records")
    limits = {name: engine.pop(name) for name in ("max_num_seqs", "max_num_batched_tokens")}
    roof_s = roofline.records_seconds(cost, hw, records)
    roof = {"seconds": roof_s, "output_tok_s": engine["output_tokens"] / roof_s if roof_s else None,
            "steps": len(records),
            "step_records": [[r.num_tokens, r.num_seqs, r.context_tokens] for r in records]}
    roof["fraction"] = engine["output_tok_s"] / roof["output_tok_s"] if roof["output_tok_s"] else None
    result = {
        "config": {"model": common.model_label(args), "device": str(device), "dtype": dtype,
                   "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
                   **limits, "async_scheduling": not args.no_async_scheduling,
                   "enforce_eager": args.enforce_eager, "kv_transfer_config": args.kv_transfer_config},
        "hardware": hw.to_dict(),
        "model_cost": cost.to_dict(),
        "engine": engine,
        "roofline": roof,
        "hf": hf.to_dict() if hf else None,
        "ours_vs_hf": engine["output_tok_s"] / hf.output_tok_s if hf else None,
    }
    common.write_json(args.json, result)
    print(format_result(result))
    return 0


def _phase(text: str) -> None:
    print(f"[bench throughput] {text}", file=sys.stderr, flush=True)


def _run_engine(args: argparse.Namespace, path: str, random_weights: bool, dtype: str) -> dict:
    from engine.llm import LLM

    llm = LLM(**common.engine_kwargs(args, path, random_weights, dtype, args.input_len + args.output_len),
              kv_transfer_config=args.kv_transfer_config)
    core = llm.engine.core
    batch_limits = {"max_num_seqs": core.config.max_num_seqs,
                    "max_num_batched_tokens": core.config.max_num_batched_tokens}
    vocab = llm.engine.model_config.vocab_size
    cost = roofline.model_cost(core.runner.model, llm.engine.model_config)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    if args.warmup_prompts > 0:
        # Other prompts than the timed ones: a prefix-cache hit would flatter the timed run.
        warmup = common.random_prompts(args.warmup_prompts, args.input_len, vocab, args.seed + 1)
        llm.generate([{"prompt_token_ids": p} for p in warmup],
                     SamplingParams(max_tokens=min(4, args.output_len), temperature=0.0, ignore_eos=True),
                     use_tqdm=False)
    prompts = [{"prompt_token_ids": p}
               for p in common.random_prompts(args.num_prompts, args.input_len, vocab, args.seed)]
    device = core.device
    core.step_records = []
    common.synchronize(device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    common.synchronize(device)
    elapsed = time.perf_counter() - start
    records, core.step_records = core.step_records, None
    common.close_engine(llm)
    del llm, core
    common.release_memory(device)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {"elapsed_s": elapsed, "requests": len(outputs), "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens, "requests_per_s": len(outputs) / elapsed,
            "output_tok_s": output_tokens / elapsed, "total_tok_s": (prompt_tokens + output_tokens) / elapsed,
            "steps": len(records), "cost": cost, "records": records, **batch_limits}


def format_result(r: dict) -> str:
    c, e, roof, hw, cost = r["config"], r["engine"], r["roofline"], r["hardware"], r["model_cost"]
    rows = [["tierkv", e["elapsed_s"], e["requests_per_s"], e["output_tokens"], e["output_tok_s"],
             e["total_tok_s"]]]
    if r["hf"]:
        hf = r["hf"]
        rows.append([f"HF transformers (batch {hf['batch_size']})", hf["elapsed_s"], None, hf["output_tokens"],
                     hf["output_tok_s"], None])
    rows.append(["roofline", roof["seconds"], None, e["output_tokens"], roof["output_tok_s"], None])
    lines = [f"throughput: {c['model']}, {c['num_prompts']} prompts, in {c['input_len']} / out {c['output_len']}, "
             f"{c['dtype']} on {c['device']} (async {'on' if c['async_scheduling'] else 'off'}, "
             f"graphs {'off' if c['enforce_eager'] else 'on'}, max_num_seqs {c['max_num_seqs']}, "
             f"max_num_batched_tokens {c['max_num_batched_tokens']})",
             common.table(["", "elapsed s", "req/s", "out tokens", "out tok/s", "total tok/s"], rows),
             f"ours / HF: {_ratio(r['ours_vs_hf'])}   ours / roofline: {common.percent(roof['fraction'])}"
             f"   ({e['steps']} steps)",
             f"ceilings: copy {hw['bandwidth_bytes_per_s'] / 1e12:.3g} TB/s, matmul {hw['peak_flops'] / 1e12:.3g} "
             f"TFLOP/s; a step reads {cost['weight_bytes'] / 1e9:.3g} GB of weights + "
             f"{cost['kv_bytes_per_token']} B of KV per context token"]
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}x"
