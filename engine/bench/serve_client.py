"""The HTTP side of `tierkv bench serve`: one streamed request timed chunk by chunk, and the server
probes around a run (model list, token counting, Prometheus counters).

Works against any OpenAI-compatible server; what only vLLM-like servers offer (`/tokenize`,
`/metrics`, `ignore_eos`, per-chunk usage) is used when there and reported as unknown when not.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import httpx

logger = logging.getLogger(__name__)

# Counter samples read from /metrics before and after a run (prometheus_client adds `_total`).
PREFIX_COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                   "vllm:external_prefix_cache_queries_total", "vllm:external_prefix_cache_hits_total")


@dataclass
class StreamResult:
    """What the client saw of one streamed request. Times are seconds from when it was sent."""

    success: bool = False
    error: str | None = None
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2e: float | None = None
    text: str = ""
    prompt_tokens: int | None = None
    output_tokens: int = 0
    cached_tokens: int | None = None
    disconnected: bool = False   # the client closed the stream after the first token, on purpose


# Server gauges sampled during a run (a soak): its memory, and requests it holds.
SERVER_GAUGES = {"process_resident_memory_bytes": "rss_bytes", "vllm:num_requests_running": "running",
                 "vllm:num_requests_waiting": "waiting"}


class _Timing:
    """Token arrivals from the chunks: per-chunk usage (when the server sends it) says how many
    tokens each chunk carries; tokens that come together split the gap before their chunk evenly
    (the first chunk's extra tokens came with the first one: gap 0)."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.last: float | None = None
        self.tokens = 0
        self.ttft: float | None = None
        self.itls: list[float] = []

    def arrive(self, now: float, new_tokens: int) -> None:
        if new_tokens <= 0:
            return
        if self.last is None:
            self.ttft = now - self.start
            self.itls.extend([0.0] * (new_tokens - 1))
        else:
            self.itls.extend([(now - self.last) / new_tokens] * new_tokens)
        self.last = now
        self.tokens += new_tokens


async def stream_request(client: httpx.AsyncClient, url: str, body: dict, headers: dict[str, str],
                         disconnect: bool = False) -> StreamResult:
    """POST `body` with `stream: true` and time every chunk; failures are returned, not raised.
    With `disconnect`, the connection is closed once the first token has arrived (a client that
    goes away mid-stream)."""
    result = StreamResult()
    start = time.perf_counter()
    timing = _Timing(start)
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:500]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                _read_chunk(json.loads(data), time.perf_counter(), timing, result)
                if result.error:
                    return result
                if disconnect and timing.ttft is not None:
                    result.ttft, result.disconnected, result.success = timing.ttft, True, True
                    return result   # leaving the `async with` closes the connection
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        result.error = f"{type(err).__name__}: {err}"
        return result
    result.e2e = time.perf_counter() - start
    result.ttft, result.itls = timing.ttft, timing.itls
    if result.output_tokens == 0:
        result.output_tokens = timing.tokens  # no usage from the server: one token per chunk
    if result.ttft is None:
        result.error = "the stream ended without any token"
    else:
        result.success = True
    return result


def _read_chunk(chunk: dict, now: float, timing: _Timing, result: StreamResult) -> None:
    if "error" in chunk:
        result.error = f"error in stream: {chunk['error'].get('message', chunk['error'])}"
        return
    choices = chunk.get("choices") or []
    text = "".join(c.get("text") or (c.get("delta") or {}).get("content") or "" for c in choices)
    result.text += text
    usage = chunk.get("usage")
    if usage:
        result.prompt_tokens = usage.get("prompt_tokens")
        result.output_tokens = usage.get("completion_tokens") or 0
        details = usage.get("prompt_tokens_details") or {}
        if details.get("cached_tokens") is not None:
            result.cached_tokens = details["cached_tokens"]
    # The last, usage-only chunk (no choices) carries no token.
    if choices and usage:
        timing.arrive(now, result.output_tokens - timing.tokens)
    elif choices and text:
        timing.arrive(now, 1)


async def first_model(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> str:
    """The first model GET /v1/models lists."""
    response = await client.get(f"{base_url}/v1/models", headers=headers)
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise SystemExit(f"tierkv bench serve: {base_url}/v1/models lists no model; pass --model")
    return models[0]["id"]


async def token_counter(client: httpx.AsyncClient, base_url: str, model: str, headers: dict[str, str]):
    """An async `count(text) -> tokens` through vLLM's POST /tokenize, or None where the server has none."""

    async def count(text: str) -> int:
        response = await client.post(f"{base_url}/tokenize", headers=headers,
                                     json={"model": model, "prompt": text, "add_special_tokens": False})
        response.raise_for_status()
        payload = response.json()
        return payload["count"] if "count" in payload else len(payload["tokens"])

    try:
        await count("probe")
    except (httpx.HTTPError, KeyError, ValueError) as err:
        logger.info("no usable %s/tokenize (%s): prompt lengths are in words", base_url, err)
        return None
    return count


async def prefix_counters(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> dict[str, float] | None:
    """The prefix-cache counters on GET /metrics, summed over their labels; None without /metrics."""
    totals = await _metric_sums(client, base_url, headers, {name: name for name in PREFIX_COUNTERS})
    if totals is None:
        logger.warning("no %s/metrics: prefix hit rates are unknown", base_url)
    return totals


async def server_gauges(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> dict[str, float] | None:
    """The server's memory and the requests it holds (`SERVER_GAUGES`) from GET /metrics; None without."""
    return await _metric_sums(client, base_url, headers, SERVER_GAUGES)


async def _metric_sums(client: httpx.AsyncClient, base_url: str, headers: dict[str, str],
                       wanted: dict[str, str]) -> dict[str, float] | None:
    """{wanted[sample name]: value summed over its labels} from GET /metrics; None without /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        response = await client.get(f"{base_url}/metrics", headers=headers)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name in wanted:
                key = wanted[sample.name]
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals
