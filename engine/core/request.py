"""One request's state inside the engine core."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from engine.sampling.params import SamplingParams
from kvstore.keys import chain_hash


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    # Members are singletons compared by identity; Enum's own __hash__ is a Python call, and the
    # status is tested against FINISHED for every request in every step.
    __hash__ = object.__hash__


FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                      RequestStatus.FINISHED_ABORTED})


@dataclass
class EngineRequest:
    """What a front end hands the engine core: tokens in, parameters, and who asked."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    metadata: dict[str, Any] | None = None


class Request:
    """A request being served: its tokens, how many have KV in the cache, and its block keys.

    `block_hashes[i]` is the chained key of block i of `all_token_ids` (full blocks only), current
    whenever it is read: prefix caching and offloading may use it at any time. Keys are computed on
    first read (at admission), not on arrival, so adding a thousand long prompts does not hash every
    block before the first step can start.
    """

    def __init__(self, req: EngineRequest, *, seed: int, max_tokens: int, block_size: int,
                 hash_seed: bytes) -> None:
        self.request_id = req.request_id
        self.prompt_token_ids = list(req.prompt_token_ids)
        self.sampling_params = req.sampling_params
        self.arrival_time = req.arrival_time
        self.priority = req.priority
        self.metadata = req.metadata or {}
        self.seed = seed
        self.max_tokens = max_tokens
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        # Tokens sampled by steps still in flight on the device (async scheduling): the scheduler
        # plans with them, the CPU appends them when their step's results are read.
        self.num_pending_outputs = 0
        self.num_cached_tokens = -1  # prefix hit at first admission; -1 = not yet admitted
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self._block_size = block_size
        self._hash_seed = hash_seed
        self._block_hashes: list[bytes] = []

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_planned_outputs(self) -> int:
        """Outputs read back plus those already sampled on the device (async scheduling)."""
        return len(self.output_token_ids) + self.num_pending_outputs

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def block_hashes(self) -> list[bytes]:
        """Keys of every full block of `all_token_ids`, extended on read for blocks filled since."""
        hashes = self._block_hashes
        bs = self._block_size
        if len(hashes) < len(self.all_token_ids) // bs:
            parent = hashes[-1] if hashes else self._hash_seed
            for start in range(len(hashes) * bs, len(self.all_token_ids) - bs + 1, bs):
                parent = chain_hash(parent, self.all_token_ids[start:start + bs])
                hashes.append(parent)
        return hashes

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status in FINISHED else None
