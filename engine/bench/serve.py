"""`tierkv bench serve`: the online benchmark, as `vllm bench serve`, against any OpenAI-compatible URL.

Requests come from the shared-prefix conversations dataset (`engine.bench.serve_dataset`): request
i is turn i // C of conversation i % C (C conversations, `--num-prompts` = C x `--turns`), all first
turns before any second one. Arrivals are a Poisson process at `--request-rate` (gamma intervals of
shape `--burstiness`, as vLLM), and a turn is sent at its arrival time or when its conversation's
previous turn has its answer, whichever is later; `--max-concurrency` caps requests in flight.
Every request streams; see `engine.bench.serve_client` for the timing and `serve_report` for the table.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import nullcontext, suppress
from dataclasses import asdict, dataclass

import httpx
from tqdm import tqdm

from engine.bench import common
from engine.bench.serve_client import (StreamResult, first_model, prefix_counters, server_gauges, stream_request,
                                       token_counter)
from engine.bench.serve_dataset import (WORDS, Conversation, DatasetConfig, build_conversations, single_token_words,
                                         word_probe)
from engine.bench.serve_report import RequestRecord, format_report, summarize

logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
# Fewer single-token words than this and the texts would repeat a handful of words: use all of WORDS.
MIN_VOCABULARY = 64


@dataclass(frozen=True)
class ServeBenchConfig:
    """The validated options of one run."""

    base_url: str
    endpoint: str
    model: str | None
    api_key: str | None
    num_prompts: int
    request_rate: float
    burstiness: float
    max_concurrency: int | None
    seed: int
    dataset: str
    num_prefixes: int
    prefix_len: int
    input_len: int
    output_len: int
    turns: int
    timeout: float
    result_json: str | None
    plot: str | None
    disable_tqdm: bool
    disconnect_fraction: float = 0.0
    server_sample_s: float = 5.0

    @property
    def num_conversations(self) -> int:
        return self.num_prompts // self.turns

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServeBenchConfig":
        """Check every option; a mistake exits naming the option and what it must be."""
        for name in ("num_prompts", "num_prefixes", "input_len", "output_len", "turns"):
            _require(getattr(args, name) >= 1, name, "at least 1", getattr(args, name))
        _require(args.prefix_len >= 0, "prefix_len", "0 or more", args.prefix_len)
        _require(args.num_prompts % args.turns == 0, "num_prompts", f"a multiple of --turns ({args.turns})",
                 args.num_prompts)
        _require(args.request_rate > 0, "request_rate", "a positive number of requests/s or inf", args.request_rate)
        _require(math.isfinite(args.burstiness) and args.burstiness > 0, "burstiness", "a positive number",
                 args.burstiness)
        _require(args.max_concurrency is None or args.max_concurrency >= 1, "max_concurrency", "at least 1",
                 args.max_concurrency)
        _require(args.timeout > 0, "timeout", "a positive number of seconds", args.timeout)
        _require(0.0 <= args.disconnect_fraction < 1.0, "disconnect_fraction", "in [0, 1)", args.disconnect_fraction)
        _require(args.disconnect_fraction == 0.0 or args.turns == 1, "disconnect_fraction",
                 "0 with --turns > 1 (a disconnected turn has no answer to continue from)", args.disconnect_fraction)
        _require(args.server_sample_s > 0, "server_sample_s", "a positive number of seconds", args.server_sample_s)
        _require(args.endpoint in ENDPOINTS, "endpoint", " or ".join(ENDPOINTS), args.endpoint)
        _require(args.base_url.startswith(("http://", "https://")), "base_url", "an http:// or https:// URL",
                 args.base_url)
        return cls(base_url=args.base_url.rstrip("/"), endpoint=args.endpoint, model=args.model,
                   api_key=args.api_key or os.environ.get("OPENAI_API_KEY"), num_prompts=args.num_prompts,
                   request_rate=args.request_rate, burstiness=args.burstiness, max_concurrency=args.max_concurrency,
                   seed=args.seed, dataset=args.dataset, num_prefixes=args.num_prefixes, prefix_len=args.prefix_len,
                   input_len=args.input_len, output_len=args.output_len, turns=args.turns, timeout=args.timeout,
                   result_json=args.result_json, plot=args.plot, disable_tqdm=args.disable_tqdm,
                   disconnect_fraction=args.disconnect_fraction, server_sample_s=args.server_sample_s)


def _require(ok: bool, option: str, expected: str, got: object) -> None:
    if not ok:
        raise SystemExit(f"tierkv bench serve: --{option.replace('_', '-')} must be {expected}, got {got!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    p.add_argument("--endpoint", default=ENDPOINTS[0], help=f"{' or '.join(ENDPOINTS)} (default %(default)s)")
    p.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--api-key", help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests in all, every turn counted (default 64)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests/s, Poisson arrivals; inf sends all at once (default inf)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival intervals: 1 Poisson, <1 burstier, >1 steadier (default 1)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no cap)")
    p.add_argument("--seed", type=int, default=0, help="seeds the texts and the arrival times")
    p.add_argument("--dataset", choices=("shared-prefix",), default="shared-prefix",
                   help="synthetic conversations sharing system prefixes (the only one)")
    p.add_argument("--num-prefixes", type=int, default=4, help="conversation groups, one shared prefix each")
    p.add_argument("--prefix-len", type=int, default=512,
                   help="tokens of each shared system prefix (words where the server has no /tokenize)")
    p.add_argument("--input-len", type=int, default=64,
                   help="tokens of new user text per turn (words where the server has no /tokenize)")
    p.add_argument("--output-len", type=int, default=32, help="tokens generated per request (exactly: ignore_eos)")
    p.add_argument("--turns", type=int, default=1,
                   help="turns per conversation; turn k's prompt is turn k-1's prompt + answer + new user text")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds one request may take")
    p.add_argument("--result-json", help="write the config, summary and every request's record here")
    p.add_argument("--plot", help="write a PNG of TTFT by hit source and over time here (needs matplotlib)")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.add_argument("--disconnect-fraction", type=float, default=0.0,
                   help="this fraction of the requests (chosen by --seed) closes its stream after the first token; "
                        "neither completed nor failed (a soak: the rest must all complete; needs --turns 1)")
    p.add_argument("--server-sample-s", type=float, default=5.0,
                   help="seconds between samples of the server's RSS and held requests from /metrics (default 5)")


def run(args: argparse.Namespace) -> int:
    config = ServeBenchConfig.from_args(args)
    # httpx logs every request at INFO: hundreds of lines that would bury the progress bar.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if config.plot:
        from engine.bench.serve_plot import require_matplotlib

        require_matplotlib()  # before the run, not after minutes of it
    try:
        result = asyncio.run(benchmark(config))
    except httpx.HTTPError as err:  # before the run: listing the models, counting tokens, reading /metrics
        raise SystemExit(f"tierkv bench serve: {config.base_url} failed: {type(err).__name__}: {err}") from None
    print(format_report(result["config"], result["summary"]))
    common.write_json(config.result_json, result)
    if config.plot:
        from engine.bench.serve_plot import write_plot

        write_plot(result, config.plot)
        logger.info("wrote %s", config.plot)
    return 0 if result["summary"]["failed"] == 0 else 1


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times of `n` requests, seconds from the start: gamma intervals of mean 1/rate (vLLM's)."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return offsets


async def benchmark(config: ServeBenchConfig) -> dict:
    """Run the whole benchmark; returns {"config", "summary", "requests"}."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    # One connection per request in flight; without a cap, as many as requests can be in flight.
    connections = config.max_concurrency or config.num_conversations
    # Idle connections are dropped well before servers close them (uvicorn after 5 s, httpx's own
    # default): a request sent on a connection the server is closing fails before it is read (one of
    # 1,536 did in a soak, absent from the server's access log).
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=1.0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(config.timeout, connect=30.0), limits=limits) as client:
        model = config.model or await first_model(client, config.base_url, headers)
        vocabulary, unit = await choose_vocabulary(await token_counter(client, config.base_url, model, headers))
        conversations = build_conversations(DatasetConfig(
            config.num_conversations, config.num_prefixes, config.prefix_len, config.input_len, config.turns,
            config.seed), vocabulary)
        before = await prefix_counters(client, config.base_url, headers)
        logger.info("sending %d requests to %s%s (model %s)", config.num_prompts, config.base_url, config.endpoint,
                    model)
        samples: list[dict] = []
        sampler = asyncio.create_task(_sample_server(client, config, headers, samples))
        records, duration = await _drive(client, config, model, conversations, headers)
        sampler.cancel()
        with suppress(asyncio.CancelledError):
            await sampler
        after_drain = await _drained(client, config.base_url, headers)
        after = await prefix_counters(client, config.base_url, headers)
    run_config = {**asdict(config), "api_key": None, "model": model, "num_conversations": config.num_conversations,
                  "length_unit": unit, "vocabulary_size": len(vocabulary)}
    summary = summarize(records, duration, before, after) | {"server": _server_summary(samples, after_drain)}
    return {"config": run_config, "summary": summary, "requests": [r.to_dict() for r in records],
            "server_samples": samples}


async def _sample_server(client: httpx.AsyncClient, config: ServeBenchConfig, headers: dict[str, str],
                         samples: list[dict]) -> None:
    """Append the server's gauges every `server_sample_s` until cancelled (nothing without /metrics)."""
    start = time.perf_counter()
    while True:
        gauges = await server_gauges(client, config.base_url, headers)
        if gauges is None:
            return
        samples.append({"t": time.perf_counter() - start, **gauges})
        await asyncio.sleep(config.server_sample_s)


async def _drained(client: httpx.AsyncClient, base_url: str, headers: dict[str, str],
                   timeout_s: float = 30.0) -> dict[str, float] | None:
    """The server's gauges once it holds no request (or after `timeout_s`: what it still holds).
    Requests whose client went away must be freed too: none may stay stuck."""
    deadline = time.perf_counter() + timeout_s
    while True:
        gauges = await server_gauges(client, base_url, headers)
        if gauges is None or gauges.get("running", 0) + gauges.get("waiting", 0) == 0 \
                or time.perf_counter() > deadline:
            return gauges
        await asyncio.sleep(0.5)


def _server_summary(samples: list[dict], after_drain: dict[str, float] | None) -> dict:
    rss = [s["rss_bytes"] / 2**20 for s in samples if "rss_bytes" in s]
    warm = rss[len(rss) // 5:] or rss   # the first fifth of the run is the warm-up
    return {"samples": len(samples), "after_drain": after_drain,
            "rss_mb": {"first": rss[0], "after_warm_up": warm[0], "max": max(rss), "last": rss[-1],
                       "max_after_warm_up": max(warm)} if rss else None}


async def choose_vocabulary(count: Callable[[str], Awaitable[int]] | None) -> tuple[list[str], str]:
    """The words to build texts from, and the unit that makes of the lengths ("tokens" or "words"):
    the single-token words when the server counts tokens and there are enough of them, else all."""
    if count is None:
        return list(WORDS), "words"
    probes = [word_probe(w) for w in WORDS]
    counts = dict(zip(probes, await asyncio.gather(*(count(p) for p in probes))))
    words = single_token_words(WORDS, counts.__getitem__)
    if len(words) < MIN_VOCABULARY:
        logger.warning("only %d of %d words are one token each: prompt lengths are in words", len(words), len(WORDS))
        return list(WORDS), "words"
    logger.info("%d of %d words are one token each: prompt lengths are exact tokens", len(words), len(WORDS))
    return words, "tokens"


def _request_body(config: ServeBenchConfig, model: str, conversation: Conversation, turn: int,
                  answers: list[str]) -> dict:
    body = {"model": model, "stream": True, "temperature": 0.0,
            # Per-chunk usage tells how many tokens each chunk carries (vLLM's extension; others ignore it).
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            # Exactly output_len tokens: no early stop at EOS.
            "ignore_eos": True, "min_tokens": config.output_len}
    if config.endpoint == "/v1/chat/completions":
        body["messages"] = conversation.chat_messages(turn, answers)
        body["max_completion_tokens"] = config.output_len
    else:
        body["prompt"] = conversation.completion_prompt(turn, answers)
        body["max_tokens"] = config.output_len
    return body


async def _drive(client: httpx.AsyncClient, config: ServeBenchConfig, model: str,
                 conversations: list[Conversation], headers: dict[str, str]) -> tuple[list[RequestRecord], float]:
    """Send every turn of every conversation on schedule; returns the records in request order."""
    n_conv = len(conversations)
    arrivals = arrival_offsets(config.num_prompts, config.request_rate, config.burstiness, config.seed)
    records: list[RequestRecord | None] = [None] * config.num_prompts
    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else nullcontext()
    url = config.base_url + config.endpoint
    progress = tqdm(total=config.num_prompts, desc="bench serve", unit="req", disable=config.disable_tqdm)
    chooser = random.Random(config.seed + 1)
    disconnects = [chooser.random() < config.disconnect_fraction for _ in range(config.num_prompts)]
    start = time.perf_counter()

    async def converse(conversation: Conversation) -> None:
        answers: list[str] = []
        for turn in range(config.turns):
            index = turn * n_conv + conversation.index
            await asyncio.sleep(max(0.0, start + arrivals[index] - time.perf_counter()))
            body = _request_body(config, model, conversation, turn, answers)
            async with limit:
                sent = time.perf_counter() - start
                result = await stream_request(client, url, body, headers, disconnects[index])
            records[index] = RequestRecord.of(index, conversation, turn, sent, result)
            progress.update(1)
            if not result.success:
                logger.warning("request %d failed: %s", index, result.error)
                _fail_rest(records, conversation, turn, n_conv, config.turns, time.perf_counter() - start, progress)
                return
            answers.append(result.text)

    await asyncio.gather(*(converse(c) for c in conversations))
    duration = time.perf_counter() - start
    progress.close()
    return records, duration


def _fail_rest(records: list, conversation: Conversation, failed_turn: int, n_conv: int, turns: int,
               now: float, progress: tqdm) -> None:
    """A conversation whose turn failed has no answer to build on: its later turns fail unsent."""
    for turn in range(failed_turn + 1, turns):
        index = turn * n_conv + conversation.index
        records[index] = RequestRecord.of(index, conversation, turn, now,
                                          StreamResult(error=f"turn {failed_turn + 1} of its conversation failed"))
        progress.update(1)
