"""A second engine for `tierkv bench offload --peer-engine`: does a prefix one engine saved to the
daemon load into another engine on the host at the rate the first loads its own?

Replicas on one host share the daemon's slab: engine A computes a prompt and saves its blocks, and
engine B, a process of its own with the same model, finds them in the slab and DMAs them into its
own pages. The bench (engine A) starts B once, as `python -m engine.bench.offload_peer`, and drives
it over its stdin and stdout, one JSON object per line: the first line is B's `LLM` arguments;
then `{"op": "cold", "prompt": [...]}` (served with offloading off), `{"op": "hit", "prompt":
[...]}` (served loading from the daemon's memory tier) and `{"op": "quit"}`. Each answer is one
line. Every peer row pairs A's save of a prompt with B's hit on it, and B's cold TTFT of another
prompt of the same length; it sits in the table beside A's own memory row.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from engine.bench import common
from engine.bench.offload import (TierRun, _FLUSH_S, _cold, _copy_gb_per_s, _hit, _phase, _prompt, _summary,
                                  _ttft)

PEER_TIER = "memory (peer)"
_REPO = Path(__file__).resolve().parents[2]


class PeerEngine:
    """Engine B, in a process of its own, answering one request at a time."""

    def __init__(self, llm_kwargs: dict) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen([sys.executable, "-m", "engine.bench.offload_peer"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=env)
        self._ask(llm_kwargs)

    def _ask(self, message: dict) -> dict:
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise SystemExit(f"tierkv bench offload: the peer engine exited ({self._proc.wait()}); its log is above")
        return json.loads(line)

    def cold(self, prompt: list[int]) -> float:
        return self._ask({"op": "cold", "prompt": prompt})["ttft_s"]

    def hit(self, prompt: list[int]) -> dict:
        return self._ask({"op": "hit", "prompt": prompt})

    def close(self) -> None:
        if self._proc.poll() is None:
            self._ask({"op": "quit"})
            self._proc.wait(timeout=60)


def peer_rows(llm, args: argparse.Namespace, llm_kwargs: dict, rng: random.Random) -> list[dict]:
    """A saves each prompt to the daemon, B serves it as a hit; B's cold TTFT of a fresh prompt of the
    same length beside it (`repeats` times every length, after one warm-up of each)."""
    _phase("peer engine: starting")
    peer = PeerEngine(llm_kwargs)
    try:
        for n in args.prompt_lens:   # B's one-time costs: its first prefill, load and save of each length
            _phase(f"peer engine: warm-up, {n} tokens")
            peer.cold(_prompt(llm, rng, n))
            _peer_run(llm, peer, _prompt(llm, rng, n))
        runs: dict[int, list[TierRun]] = {}
        for rep in range(args.repeats):
            for n in args.prompt_lens:
                _phase(f"peer engine: TTFT, {n} tokens, repeat {rep + 1}/{args.repeats}")
                runs.setdefault(n, []).append(_peer_run(llm, peer, _prompt(llm, rng, n), peer.cold(_prompt(llm, rng, n))))
    finally:
        peer.close()
    return [_summary(row) for row in runs.values()]


def _peer_run(llm, peer: PeerEngine, prompt: list[int], cold_s: float = 0.0) -> TierRun:
    saved_bytes, save_s, dropped = _cold(llm, "memory", prompt)[1:]
    hit = peer.hit(prompt)
    return TierRun(PEER_TIER, len(prompt), cold_s or hit["ttft_s"], hit["ttft_s"], saved_bytes, save_s, dropped,
                   None, hit["hit_tokens"], hit["loaded_tokens"], hit["loaded_bytes"], hit["load_s"],
                   hit["h2d_copy_gb_per_s"])


def _serve(llm, message: dict) -> dict:
    """Engine B's answer to one request of the bench."""
    if message["op"] == "cold":
        return {"ttft_s": _ttft(llm, message["prompt"], {"offload": False})}
    llm.engine.core.kv.pool.reset_prefix_cache()   # the hit must come from the daemon, not B's own GPU cache
    ttft, hit_tokens, loaded_tokens, loaded_bytes, load_s = _hit(llm, "memory", message["prompt"])
    return {"ttft_s": ttft, "hit_tokens": hit_tokens, "loaded_tokens": loaded_tokens, "loaded_bytes": loaded_bytes,
            "load_s": load_s,
            "h2d_copy_gb_per_s": _copy_gb_per_s(loaded_bytes, llm.engine.core.device, to_device=True)}


def main() -> int:
    """Engine B: build the engine from the first line, then answer the bench line by line."""
    from engine.llm import LLM

    replies = sys.stdout
    sys.stdout = sys.stderr   # nothing but answers on the bench's pipe
    llm = LLM(**json.loads(sys.stdin.readline()))
    replies.write("{}\n")
    replies.flush()
    try:
        for line in sys.stdin:
            message = json.loads(line)
            if message["op"] == "quit":
                llm.engine.core.connector.flush(_FLUSH_S)
                replies.write("{}\n")
                replies.flush()
                break
            replies.write(json.dumps(_serve(llm, message)) + "\n")
            replies.flush()
    finally:
        common.close_engine(llm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
