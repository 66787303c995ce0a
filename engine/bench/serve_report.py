"""The results of `tierkv bench serve`: per-request records, where each prompt's prefix came from,
the summary numbers and the printed table."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from engine.bench import common
from engine.bench.serve_client import StreamResult
from engine.bench.serve_dataset import Conversation

COLD, PREFIX_HIT, CONVERSATION_HIT = "cold", "prefix hit", "conversation hit"
HIT_SOURCES = (COLD, PREFIX_HIT, CONVERSATION_HIT)


@dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds, `send_time` from the run's start.

    `hit_source`: `cold` (nothing cached), `prefix hit` (a first turn that reused its group's system
    prefix) or `conversation hit` (a later turn that reused the conversation so far). With the server's
    `cached_tokens` it is what happened (`hit_basis` "server"); without, what the dataset implies
    (`hit_basis` "dataset": the group's first conversation's first turn is cold, the rest hits).
    Whether a hit came from the GPU prefix cache or from the offload store is not reported per request.
    """

    index: int
    conversation: int
    group: int
    turn: int
    first_in_group: bool
    send_time: float
    success: bool
    error: str | None
    ttft: float | None
    itls: list[float] = field(default_factory=list)
    e2e: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    cached_tokens: int | None = None
    hit_source: str = COLD
    hit_basis: str = "dataset"
    disconnected: bool = False

    @classmethod
    def of(cls, index: int, conversation: Conversation, turn: int, send_time: float,
           result: StreamResult) -> "RequestRecord":
        record = cls(index=index, conversation=conversation.index, group=conversation.group, turn=turn,
                     first_in_group=conversation.first_in_group and turn == 0, send_time=send_time,
                     success=result.success, error=result.error, ttft=result.ttft, itls=result.itls,
                     e2e=result.e2e, prompt_tokens=result.prompt_tokens, output_tokens=result.output_tokens,
                     cached_tokens=result.cached_tokens, disconnected=result.disconnected)
        record.hit_source, record.hit_basis = _hit_source(record)
        return record

    def to_dict(self) -> dict:
        return asdict(self)


def _hit_source(r: RequestRecord) -> tuple[str, str]:
    if r.cached_tokens is not None:
        if r.cached_tokens == 0:
            return COLD, "server"
        return (PREFIX_HIT if r.turn == 0 else CONVERSATION_HIT), "server"
    if r.first_in_group:
        return COLD, "dataset"
    return (PREFIX_HIT if r.turn == 0 else CONVERSATION_HIT), "dataset"


def _stats_ms(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p99": None}
    ms = [1e3 * v for v in values]
    return {"mean": statistics.fmean(ms), "median": statistics.median(ms), "p99": common.percentile(ms, 99)}


def _rate(hits: float, queries: float) -> float | None:
    return hits / queries if queries > 0 else None


def prefix_cache_deltas(before: dict[str, float] | None, after: dict[str, float] | None) -> dict:
    """GPU (local) and external (offload) prefix-cache hit rates over the run, from counter deltas."""
    out = {}
    for name, prefix in (("gpu", "vllm:prefix_cache"), ("external", "vllm:external_prefix_cache")):
        queries_key, hits_key = f"{prefix}_queries_total", f"{prefix}_hits_total"
        if before is None or after is None or queries_key not in after or hits_key not in after:
            out[name] = None
            continue
        queries = after[queries_key] - before.get(queries_key, 0.0)
        hits = after[hits_key] - before.get(hits_key, 0.0)
        out[name] = {"queries": int(queries), "hits": int(hits), "hit_rate": _rate(hits, queries)}
    return out


def _group_rows(records: Sequence[RequestRecord], key: Callable[[RequestRecord], object],
                label: str) -> list[dict]:
    rows = []
    # Hit sources in their own order (cold first), turns in number order.
    for value in sorted({key(r) for r in records}, key=lambda v: HIT_SOURCES.index(v) if v in HIT_SOURCES else v):
        chosen = [r for r in records if key(r) == value]
        prompt = [r.prompt_tokens for r in chosen if r.prompt_tokens is not None]
        cached = [r.cached_tokens for r in chosen if r.cached_tokens is not None and r.prompt_tokens is not None]
        rows.append({label: value, "requests": len(chosen),
                     "prompt_tokens_mean": statistics.fmean(prompt) if prompt else None,
                     "cached_rate": _rate(sum(cached), sum(prompt)) if cached else None,
                     "ttft_ms": _stats_ms([r.ttft for r in chosen])})
    return rows


def summarize(records: Sequence[RequestRecord], duration: float, counters_before: dict | None,
              counters_after: dict | None) -> dict:
    """The run's numbers: counts, throughputs, latency stats (ms), prefix hit rates, per source and turn.
    Requests whose client disconnected on purpose count as neither completed nor failed."""
    done = [r for r in records if r.success and not r.disconnected]
    disconnected = sum(r.disconnected for r in records)
    input_tokens = sum(r.prompt_tokens or 0 for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    reported = [r for r in done if r.cached_tokens is not None and r.prompt_tokens is not None]
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    cached, prompt = sum(r.cached_tokens for r in reported), sum(r.prompt_tokens for r in reported)
    return {
        "completed": len(done), "failed": len(records) - len(done) - disconnected, "disconnected": disconnected,
        "duration_s": duration,
        "request_throughput": len(done) / duration, "input_tokens": input_tokens, "output_tokens": output_tokens,
        "input_throughput": input_tokens / duration, "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": _stats_ms([r.ttft for r in done]), "tpot_ms": _stats_ms(tpots),
        "itl_ms": _stats_ms([gap for r in done for gap in r.itls]), "e2e_ms": _stats_ms([r.e2e for r in done]),
        "prefix_cache": prefix_cache_deltas(counters_before, counters_after),
        "cached_tokens": {"reported": bool(reported), "cached": cached, "prompt": prompt,
                          "rate": _rate(cached, prompt)},
        "hit_basis": "server" if reported else "dataset",
        "by_hit_source": _group_rows(done, lambda r: r.hit_source, "hit_source"),
        "by_turn": _group_rows(done, lambda r: r.turn + 1, "turn"),
    }


def format_report(config: dict, s: dict) -> str:
    """The printed result: a header line, the totals, latency and prefix-cache tables."""
    lines = [f"serve: {config['model']} at {config['base_url']}{config['endpoint']}, {config['num_prompts']} requests "
             f"({config['num_conversations']} conversations x {config['turns']} turns; {config['num_prefixes']} "
             f"prefixes of {config['prefix_len']}, input {config['input_len']}, output {config['output_len']} "
             f"{config['length_unit']}), rate {config['request_rate']} req/s (burstiness {config['burstiness']}), "
             f"max concurrency {config['max_concurrency'] or 'unlimited'}",
             common.table(["", "value"], [
                 ["completed / failed / disconnected", f"{s['completed']} / {s['failed']} / {s['disconnected']}"],
                 ["duration s", s["duration_s"]],
                 ["requests/s", s["request_throughput"]],
                 ["input tok/s", s["input_throughput"]],
                 ["output tok/s", s["output_throughput"]],
                 ["total tok/s", s["total_token_throughput"]],
                 ["input / output tokens", f"{s['input_tokens']} / {s['output_tokens']}"]]),
             "",
             common.table(["latency ms", "mean", "median", "p99"],
                          [[name, s[key]["mean"], s[key]["median"], s[key]["p99"]]
                           for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"),
                                             ("E2E", "e2e_ms"))]),
             ""]
    pc = s["prefix_cache"]
    rows = [[f"{label} (/metrics delta)", None if pc[key] is None else pc[key]["queries"],
             None if pc[key] is None else pc[key]["hits"], common.percent(pc[key] and pc[key]["hit_rate"])]
            for label, key in (("GPU prefix cache", "gpu"), ("offload (external)", "external"))]
    cached = s["cached_tokens"]
    if cached["reported"]:
        rows.append(["usage cached_tokens", cached["prompt"], cached["cached"], common.percent(cached["rate"])])
    lines.append(common.table(["prefix hits, tokens", "queried", "hit", "hit rate"], rows))
    lines.append("")
    for label, key in ((f"by hit source ({s['hit_basis']})", "by_hit_source"), ("by turn", "by_turn")):
        first = "hit_source" if key == "by_hit_source" else "turn"
        lines.append(common.table(
            [label, "requests", "prompt tok", "cached", "TTFT mean ms", "TTFT median ms", "TTFT p99 ms"],
            [[row[first], row["requests"], row["prompt_tokens_mean"], common.percent(row["cached_rate"]),
              row["ttft_ms"]["mean"], row["ttft_ms"]["median"], row["ttft_ms"]["p99"]] for row in s[key]]))
        lines.append("")
    server = s.get("server")
    if server and server["rss_mb"]:
        rss, drain = server["rss_mb"], server["after_drain"] or {}
        lines.append(f"server RSS MiB: {rss['first']:.0f} at the start, {rss['after_warm_up']:.0f} after warm-up, "
                     f"{rss['max']:.0f} max, {rss['last']:.0f} at the end ({server['samples']} samples); "
                     f"requests held after the run: {drain.get('running', 'unknown')} running, "
                     f"{drain.get('waiting', 'unknown')} waiting")
    return "\n".join(lines).rstrip()
