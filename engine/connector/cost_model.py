"""Load or recompute, decided per request from measured rates: a hit must never make a request slower.

A store tier is worth loading from only while moving a block costs less than computing its tokens.
The worker side measures each tier's load rate (bytes per second, over the loads it finishes) and
the connector the engine's prefill rate (prompt tokens per second, over requests that computed at
least one block's worth); both are moving averages, so they follow a busy engine or a congested
network. For a request whose lookup found `n` blocks, block `j` from tier `t_j`, the time to have
the first `k` blocks is

    cost(k) = sum_{j<k} block_bytes / rate(t_j)  +  (prompt tokens after block k) / prefill_rate

and the connector loads the `k` that minimises it (often all, or none; a fast tier above a slow one
gives a prefix). Recomputing is linear in tokens here, although attention makes long prompts cost
more per token: the model then errs towards recomputing, which is never wrong, only sometimes slower.

Before any measurement, a tier is assumed fast (the operator configured it to be used); the first
load through it gives a rate. A policy sees the same estimates in `RequestInfo` and can turn the
model off for a request (`Decision(cost_model=False)`).

A tier from which a block takes longer to load than its tokens take to compute is not even looked
up (`slow_tiers`): its lookup's own latency (an S3 HEAD per block, tens of ms) would make the
request slower than having no store. A tier's rate is forgotten `RATE_TTL_S` after its last load,
so a tier that became fast again is looked up, loaded from and measured once more.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

# Weight of a new sample in the moving averages: a few loads are enough to follow a change.
_ALPHA = 0.3
RATE_TTL_S = 60.0


@dataclass(frozen=True)
class RateEstimates:
    """Moving averages at one moment: bytes/s per tier, prompt tokens/s of prefill (None: unmeasured)."""

    tier_bytes_per_s: dict[str, float]
    prefill_tokens_per_s: float | None


class CostModel:
    """Keeps the rates and chooses how many leading hit blocks to load; thread-safe."""

    def __init__(self, block_size: int, block_bytes: int) -> None:
        self.block_size = block_size
        self.block_bytes = block_bytes
        self._lock = threading.Lock()
        self._tier_rate: dict[str, float] = {}
        self._tier_seen: dict[str, float] = {}   # monotonic time of each tier's last load
        self._prefill_rate: float | None = None

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        """A load moved `nbytes` from `tier` into pages in `seconds` (worker side)."""
        if nbytes > 0 and seconds > 0:
            with self._lock:
                self._tier_rate[tier] = _average(self._tier_rate.get(tier), nbytes / seconds)
                self._tier_seen[tier] = time.monotonic()

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """The engine computed `tokens` prompt tokens of one request in `seconds`."""
        if tokens >= self.block_size and seconds > 0:
            with self._lock:
                self._prefill_rate = _average(self._prefill_rate, tokens / seconds)

    def estimates(self) -> RateEstimates:
        now = time.monotonic()
        with self._lock:
            for tier in [t for t, seen in self._tier_seen.items() if now - seen > RATE_TTL_S]:
                del self._tier_rate[tier], self._tier_seen[tier]
            return RateEstimates(dict(self._tier_rate), self._prefill_rate)

    def slow_tiers(self) -> set[str]:
        """Tiers from which loading a block is estimated slower than computing its tokens."""
        est = self.estimates()
        if est.prefill_tokens_per_s is None:
            return set()
        compute_s = self.block_size / est.prefill_tokens_per_s
        return {tier for tier, rate in est.tier_bytes_per_s.items() if self.block_bytes / rate >= compute_s}

    def blocks_to_load(self, tiers: list[str], first_block: int, first_token: int, prompt_len: int) -> int:
        """How many of the hit blocks `first_block`.. (block j from `tiers[j]`) to load, counted from
        `first_block`; tokens before `first_token` are on the GPU already."""
        est = self.estimates()
        if est.prefill_tokens_per_s is None:
            return len(tiers) - first_block
        per_token = 1.0 / est.prefill_tokens_per_s
        best_k, best_cost, load_s = 0, (prompt_len - first_token) * per_token, 0.0
        for k in range(first_block, len(tiers)):
            rate = est.tier_bytes_per_s.get(tiers[k])
            load_s += self.block_bytes / rate if rate else 0.0
            ready = max(first_token, min((k + 1) * self.block_size, prompt_len - 1))
            cost = load_s + (prompt_len - ready) * per_token
            if cost < best_cost:
                best_k, best_cost = k + 1 - first_block, cost
        return best_k


def _average(old: float | None, sample: float) -> float:
    return sample if old is None else (1 - _ALPHA) * old + _ALPHA * sample
