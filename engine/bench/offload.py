"""Offload: TTFT cold vs a prefix hit from each tier, and decode inter-token latency with saving on vs off.

One engine with an embedded store of every tier asked for (memory always; Redis and S3 from URLs, or
started here with --start-redis / --start-moto). For each tier, a fresh random prompt is served cold
(its blocks written to that tier only), the GPU prefix cache is emptied, and the same prompt is served
again: its prefix now comes from that tier alone. The load rate (bytes loaded over the connector's
load time, fetch and scatter into pages) is set against a plain copy of the same bytes measured in the
same run: host memcpy on CPU, pinned host-to-device on CUDA. Then concurrent decodes run on the same
engine, alternately with the policy saving their blocks and refusing them (no lookup, no save), and
the inter-token latencies are compared. The per-request choices go through a policy class,
`engine.bench.offload:TiersFromMetadata`, which reads them from the request's metadata.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import torch

from engine.connector.policy import Decision, RequestInfo
from engine.llm import LLM
from engine.sampling.params import SamplingParams


class TiersFromMetadata:
    """Offload unless the caller's metadata says `"offload": false`; write through `metadata["tiers"]`."""

    def on_new_request(self, info: RequestInfo) -> Decision:
        offload = info.metadata.get("offload", True)
        return Decision(load=offload, save=offload, tiers=info.metadata.get("tiers"))


@dataclass
class TierResult:
    tier: str
    prompt_tokens: int
    cold_ttft_s: float
    hit_ttft_s: float
    hit_tokens: int          # tokens the lookup found in this tier (all of the hit, or the tier was not alone)
    loaded_tokens: int
    load_gb_per_s: float
    copy_gb_per_s: float     # the same bytes copied plainly, measured right after the load

    @property
    def speedup(self) -> float:
        return self.cold_ttft_s / self.hit_ttft_s

    @property
    def load_fraction(self) -> float:
        return self.load_gb_per_s / self.copy_gb_per_s if self.copy_gb_per_s else 0.0


@dataclass
class DecodeResult:
    saving: str
    requests: int
    itl_samples: int
    itl_mean_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    saved_blocks: int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory or GGUF file (default: the embedded SmolLM2-135M)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt-len", type=int, default=4096, help="tokens of the long prompt (TTFT part)")
    p.add_argument("--block-size", type=int, default=256, help="tokens per offloaded block")
    p.add_argument("--cpu-bytes", default="4GiB", help="memory tier budget")
    p.add_argument("--redis-url", help="measure a Redis tier at this URL")
    p.add_argument("--start-redis", action="store_true", help="start a private redis-server for the Redis tier")
    p.add_argument("--s3-endpoint", help="host:port of an S3 endpoint (http) for the S3 tier")
    p.add_argument("--s3-bucket", default="tierkv-bench", help="bucket of the S3 tier (created if missing)")
    p.add_argument("--s3-access-key", default="bench-access-key")
    p.add_argument("--s3-secret-key", default="bench-secret-key")
    p.add_argument("--start-moto", action="store_true", help="start moto's S3 server here for the S3 tier")
    p.add_argument("--decode-requests", type=int, default=8, help="concurrent decodes (ITL part)")
    p.add_argument("--decode-prompt-len", type=int, default=224,
                   help="prompt tokens per decode (just under a block, so saves land mid-decode)")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per decode")
    p.add_argument("--repeats", type=int, default=1, help="decode runs per mode (alternating off/on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        tiers = _secondary_tiers(args, stack)
        llm = _engine(args, tiers)
        stack.callback(llm.engine.core.close)
        rng = random.Random(args.seed)
        # The first forwards pay one-time costs (allocator, thread pools): keep them out of the cold row.
        _ttft(llm, _prompt(llm, rng, args.block_size), {"offload": False})
        names = ["memory"] + [t["type"] for t in tiers]
        tier_results = [_tier_ttft(llm, name, _prompt(llm, rng, args.prompt_len)) for name in names]
        decode_results = _decode_itl(llm, args, rng)
    print(_format(tier_results, decode_results, args))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"ttft": [asdict(r) | {"speedup": r.speedup, "load_fraction": r.load_fraction}
                                for r in tier_results],
                       "decode": [asdict(r) for r in decode_results]}, out, indent=1)
    return 0


def _engine(args: argparse.Namespace, secondary_tiers: list[dict]) -> LLM:
    longest = max(args.prompt_len, args.decode_prompt_len + args.decode_requests * 8 + args.decode_tokens)
    cfg = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
           "kv_connector_extra_config": {
               "block_size": args.block_size, "cpu_bytes_to_use": args.cpu_bytes,
               "secondary_tiers": secondary_tiers, "max_pending_saves": 4 * args.decode_requests,
               "policy": {"class": "engine.bench.offload:TiersFromMetadata"}}}
    return LLM(args.model, dtype=args.dtype, max_model_len=longest + 16, kv_transfer_config=cfg)


def _prompt(llm: LLM, rng: random.Random, n: int) -> list[int]:
    vocab = llm.engine.model_config.vocab_size
    return [rng.randrange(vocab) for _ in range(n)]


def _tier_ttft(llm: LLM, tier: str, prompt: list[int]) -> TierResult:
    """Cold TTFT (blocks saved to `tier` only), then TTFT with the prefix coming from `tier`."""
    core = llm.engine.core
    cold = _ttft(llm, prompt, {"tiers": [tier]})
    core.connector.flush(120.0)
    core.kv.pool.reset_prefix_cache()
    before = core.connector.metrics.snapshot()
    hit = _ttft(llm, prompt, {"tiers": [tier]})
    core.connector.flush(120.0)  # the hit saves the prompt's last block: keep it out of the decode part
    after = core.connector.metrics.snapshot()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    load_s = delta("tierkv:offload_load_seconds_sum")
    loaded_bytes = int(delta("tierkv:offload_loaded_bytes"))
    return TierResult(tier, len(prompt), cold, hit, int(delta(f"tierkv:offload_hit_tokens{{tier={tier}}}")),
                      int(delta("tierkv:offload_loaded_tokens")), loaded_bytes / load_s / 1e9 if load_s else 0.0,
                      _copy_gb_per_s(loaded_bytes, core.connector.transfer.kv_cache.device))


def _ttft(llm: LLM, prompt: list[int], metadata: dict) -> float:
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


def _copy_gb_per_s(nbytes: int, device: torch.device, repeats: int = 5) -> float:
    """The ceiling for moving `nbytes` into the KV cache's device: best of `repeats` plain copies
    (host memcpy on CPU; pinned host-to-device on CUDA, where loads land through pinned memory)."""
    if not nbytes:
        return 0.0
    cuda = device.type == "cuda"
    src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dst = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def _decode_itl(llm: LLM, args: argparse.Namespace, rng: random.Random) -> list[DecodeResult]:
    samples: dict[str, list[float]] = {"off": [], "on": []}
    saved: dict[str, int] = {"off": 0, "on": 0}
    metrics = llm.engine.core.connector.metrics
    for _ in range(args.repeats):
        for mode in ("off", "on"):
            before = metrics.snapshot().get("tierkv:offload_saved_blocks", 0)
            samples[mode] += _one_decode_run(llm, args, rng, {"offload": mode == "on"})
            llm.engine.core.connector.flush(120.0)
            saved[mode] += int(metrics.snapshot().get("tierkv:offload_saved_blocks", 0) - before)
    return [_decode_result(mode, args.decode_requests * args.repeats, samples[mode], saved[mode])
            for mode in ("off", "on")]


def _one_decode_run(llm: LLM, args: argparse.Namespace, rng: random.Random, metadata: dict) -> list[float]:
    """Inter-token gaps of `decode_requests` concurrent decodes (prompt lengths staggered by 8 tokens,
    so each crosses a block boundary, and is saved, at a different step)."""
    engine = llm.engine
    params = SamplingParams(max_tokens=args.decode_tokens, temperature=0.0, ignore_eos=True)
    last: dict[str, float] = {}
    gaps: list[float] = []
    for i in range(args.decode_requests):
        rid = engine.add_request(_prompt(llm, rng, args.decode_prompt_len + 8 * i), params, metadata=metadata)
        last[rid] = 0.0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if last[out.request_id]:
                gaps.append(now - last[out.request_id])
            last[out.request_id] = now
    return gaps


def _decode_result(mode: str, requests: int, gaps: list[float], saved: int) -> DecodeResult:
    ms = sorted(g * 1e3 for g in gaps)
    return DecodeResult(mode, requests, len(ms), statistics.fmean(ms), ms[len(ms) // 2],
                        ms[min(len(ms) - 1, int(0.99 * len(ms)))], saved)


def _format(tiers: list[TierResult], decodes: list[DecodeResult], args: argparse.Namespace) -> str:
    lines = [f"time to first token, {tiers[0].prompt_tokens}-token prompt, {args.block_size}-token blocks",
             f"{'tier':<8} {'cold s':>8} {'hit s':>8} {'speedup':>8} {'hit tok':>8} {'loaded tok':>11} "
             f"{'load GB/s':>10} {'copy GB/s':>10} {'of copy':>8}"]
    for r in tiers:
        lines.append(f"{r.tier:<8} {r.cold_ttft_s:>8.3f} {r.hit_ttft_s:>8.3f} {r.speedup:>7.1f}x {r.hit_tokens:>8d} "
                     f"{r.loaded_tokens:>11d} {r.load_gb_per_s:>10.2f} {r.copy_gb_per_s:>10.2f} "
                     f"{r.load_fraction:>7.1%}")
    lines += ["", f"inter-token latency, {args.decode_requests} concurrent decodes of {args.decode_tokens} tokens "
                  f"(prompts {args.decode_prompt_len}+8i tokens)",
              f"{'saving':<8} {'gaps':>6} {'mean ms':>8} {'p50 ms':>8} {'p99 ms':>8} {'saved blocks':>13}"]
    for r in decodes:
        lines.append(f"{r.saving:<8} {r.itl_samples:>6d} {r.itl_mean_ms:>8.2f} {r.itl_p50_ms:>8.2f} "
                     f"{r.itl_p99_ms:>8.2f} {r.saved_blocks:>13d}")
    off, on = decodes
    lines.append(f"saving on / off: mean {on.itl_mean_ms / off.itl_mean_ms:.3f}, "
                 f"p99 {on.itl_p99_ms / off.itl_p99_ms:.3f}")
    return "\n".join(lines)


# --- tiers: given by URL, or started here ---------------------------------------------------------

def _secondary_tiers(args: argparse.Namespace, stack: ExitStack) -> list[dict]:
    tiers = []
    redis_url = _start_redis(stack) if args.start_redis else args.redis_url
    if redis_url:
        tiers.append({"type": "redis", "url": redis_url, "key_prefix": "tierkv-bench:"})
    endpoint = _start_moto(stack) if args.start_moto else args.s3_endpoint
    if endpoint:
        _ensure_bucket(endpoint, args)
        tiers.append({"type": "obj", "bucket": args.s3_bucket, "endpoint_override": endpoint, "scheme": "http",
                      "access_key": args.s3_access_key, "secret_key": args.s3_secret_key})
    return tiers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_redis(stack: ExitStack) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("tierkv bench offload: --start-redis needs the redis-server binary on PATH")
    port = _free_port()
    workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tierkv-bench-redis-"))
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(proc.wait, 10)
    stack.callback(proc.terminate)
    _wait_for_port(port, "redis-server")
    return f"redis://127.0.0.1:{port}/0"


def _start_moto(stack: ExitStack) -> str:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise SystemExit("tierkv bench offload: --start-moto needs moto[server] (pip install 'moto[server]')") from None
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per S3 request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    stack.callback(server.stop)
    _wait_for_port(port, "moto server")
    return f"127.0.0.1:{port}"


def _wait_for_port(port: int, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"tierkv bench offload: {what} did not come up on port {port} within {timeout_s} s")


def _ensure_bucket(endpoint: str, args: argparse.Namespace) -> None:
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1",
                      aws_access_key_id=args.s3_access_key, aws_secret_access_key=args.s3_secret_key)
    try:
        s3.create_bucket(Bucket=args.s3_bucket)
    except ClientError as e:
        if e.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
