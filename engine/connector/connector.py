"""The offloading connector, scheduler side: policy, lookup, and which blocks to load or save.

Units: the engine's KV cache is paged (`page` = one engine block of `block_size` tokens); the
store holds `blocks` of `offload block_size` tokens = `pages_per_block` pages. Store block j of a
request is keyed by the engine's chained hash of its last page, seeded by the model namespace, so
any replica with the same model, dtype and layout computes the same key for the same prefix.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from engine.connector.config import KVTransferConfig
from engine.connector.cost_model import CostModel
from engine.connector.embedded_store import EmbeddedStore, check_unreachable
from engine.connector.metrics import ConnectorMetrics
from engine.connector.policy import Decision, RequestInfo, check_policy_tiers, load_policy
from engine.connector.store_backend import DaemonStore, open_store
from engine.connector.jobs import LoadJob, SaveJob
from engine.connector.slab_transfer import SlabTransfer
from engine.connector.transfer import BlockTransfer
from engine.core.request import Request
from engine.core.sched_output import SchedulerOutput
from kvstore.backoff import Backoff, Cooldown
from kvstore.checksum import CHUNK_BYTES
from kvstore.config import ConfigError
from kvstore.store import LookupResult

logger = logging.getLogger(__name__)

_NO_OFFLOAD = Decision(load=False, save=False)
# Slab slots beyond the saves in flight for loads, when no memory tier holds blocks (staging only).
_LOAD_STAGING_SLOTS = 64
# After a failed lookup, admissions skip the store (a miss) for this long, doubling per failure:
# a dead daemon must not cost every new request a connection attempt on the scheduler's path.
_LOOKUP_BACKOFF = Backoff(initial_s=0.5, max_s=10.0)


@dataclass
class _RequestOffload:
    decision: Decision
    blocks_in_store: int = 0   # leading blocks the store reported at admission (not saved again)
    blocks_saved: int = 0      # leading blocks handled by the save path so far
    load_from: int = 0         # first block being loaded
    load_start_tokens: int = 0 # tokens already on the GPU when the load started
    load_end_tokens: int = 0   # tokens covered once the load completes
    # The lookup of the current admission attempt: a request that waits for free pages is tried
    # again every step, and must not cost a Lookup (and count its hits) each time.
    found: LookupResult | None = None
    prefill: tuple[float, int] | None = None   # (when it joined the running requests, tokens to compute)


class OffloadingConnector:
    """Decides per request what is loaded from and saved to the store, and drives the transfers."""

    def __init__(self, cfg: KVTransferConfig, kv_cache: torch.Tensor, page_size: int, namespace: str,
                 model_name: str) -> None:
        self.cfg = cfg
        offload = cfg.offload
        if offload.block_size % page_size:
            raise ConfigError(f"kv_transfer_config.kv_connector_extra_config.block_size: expected a multiple of "
                              f"the engine's block_size ({page_size}), got {offload.block_size}")
        self.page_size = page_size
        self.block_size = offload.block_size
        self.pages_per_block = offload.block_size // page_size
        self.model_name = model_name
        self.namespace = namespace
        self.policy = load_policy(offload.policy)
        self.metrics = ConnectorMetrics(model_name)
        page_bytes = kv_cache[0].numel() * kv_cache.element_size()
        if page_bytes % CHUNK_BYTES:
            raise ConfigError(f"block_size: a KV page of {page_bytes} bytes is not a whole number of "
                              f"{CHUNK_BYTES}-byte checksum chunks; use a larger engine block_size")
        block_bytes = self.pages_per_block * page_bytes
        if offload.kvstore_url:
            self.store = open_store(offload, block_bytes, pin=kv_cache.is_cuda)
        else:
            self.store = EmbeddedStore(offload, block_bytes, offload.max_pending_saves + _LOAD_STAGING_SLOTS,
                                       pin=kv_cache.is_cuda)
            check_unreachable(self.store)
        try:
            check_policy_tiers(self.policy, list(self.store.health()))
        except ConfigError:
            self.store.close()
            raise
        self.cost = CostModel(self.block_size, block_bytes)
        if isinstance(self.store, DaemonStore):   # a remote daemon: blocks as gRPC payloads
            self.transfer = BlockTransfer(kv_cache, self.store, namespace, self.pages_per_block, self.metrics,
                                          offload.max_pending_saves, self.cost)
        else:
            self.transfer = SlabTransfer(kv_cache, self.store, namespace, self.pages_per_block, self.metrics,
                                         self.cost)
        self._requests: dict[str, _RequestOffload] = {}
        self._lookup_cooldown = Cooldown(_LOOKUP_BACKOFF)

    # --- admission ------------------------------------------------------------------------------
    def _state(self, request: Request, gpu_hit_tokens: int) -> _RequestOffload:
        state = self._requests.get(request.request_id)
        if state is None:
            info = RequestInfo(request.request_id, request.num_prompt_tokens, gpu_hit_tokens, request.priority,
                               self.model_name, dict(request.metadata), self.cost.estimates())
            try:
                decision = self.policy.on_new_request(info)
            except Exception:  # a broken user policy costs offloading for this request, nothing more
                logger.exception("offload policy failed for request %s; not offloading it", request.request_id)
                decision = _NO_OFFLOAD
            decision = Decision(load=decision.load and self.cfg.can_load, save=decision.save and self.cfg.can_save,
                                tiers=decision.tiers, ttl_s=decision.ttl_s, cost_model=decision.cost_model)
            state = self._requests[request.request_id] = _RequestOffload(decision)
        return state

    def block_key(self, request: Request, j: int) -> bytes:
        return request.block_hashes[(j + 1) * self.pages_per_block - 1]

    def num_tokens_to_load(self, request: Request, gpu_hit_tokens: int) -> int:
        """Tokens beyond the GPU prefix-cache hit that the store holds (0 = nothing to load).

        One Lookup of the request's block keys per admission (kept while the request waits for
        pages). At least one prompt token is always left to compute: its forward gives the logits
        of the first new token.
        """
        state = self._state(request, gpu_hit_tokens)
        if not (state.decision.load or state.decision.save):
            return 0
        num_blocks = request.num_tokens // self.block_size
        if num_blocks == 0:
            return 0
        first_try = state.found is None
        if first_try:
            slow = (self.cost.slow_tiers() if self.cfg.offload.load_cost_model and state.decision.cost_model
                    else set())
            state.found = self._lookup(request, [self.block_key(request, j) for j in range(num_blocks)], slow)
            if state.found is None:
                return 0
            state.blocks_in_store = state.found.num_hits
        if not state.decision.load:
            return 0
        # A prompt that ends on a block boundary loads its last block too and recomputes only its
        # last token (whose logits give the first new token): 1 token, not 256, to compute.
        hit_end = min(state.found.num_hits * self.block_size, request.num_tokens - 1)
        load_end = hit_end
        if self.cfg.offload.load_cost_model and state.decision.cost_model and hit_end > gpu_hit_tokens:
            first = gpu_hit_tokens // self.block_size
            k = self.cost.blocks_to_load(state.found.tiers, first, gpu_hit_tokens, request.num_tokens)
            load_end = max(gpu_hit_tokens, min((first + k) * self.block_size, hit_end))
        if first_try:
            for j, tier in enumerate(state.found.tiers):
                new = min((j + 1) * self.block_size, hit_end) - max(j * self.block_size, gpu_hit_tokens)
                self.metrics.inc(self.metrics.hit_tokens, max(0, new), tier=tier)
                skipped = min((j + 1) * self.block_size, hit_end) - max(j * self.block_size, load_end)
                self.metrics.inc(self.metrics.skipped_load_tokens, max(0, skipped), tier=tier)
        return max(0, load_end - gpu_hit_tokens)

    def _lookup(self, request: Request, keys: list[bytes], skip: set[str]) -> LookupResult | None:
        """One Lookup, not asking the tiers in `skip`; None (a miss) when the store fails or is backing
        off after a failure."""
        if not self._lookup_cooldown.ready():
            return None
        for tier in skip:
            self.metrics.inc(self.metrics.unasked_lookups, tier=tier)
        try:
            found = self.store.lookup(self.namespace, keys, skip)
        except Exception as e:  # noqa: BLE001 - a store that cannot answer is a miss
            self.metrics.inc(self.metrics.store_errors, op="lookup")
            logger.warning("store lookup failed for %s: %s; skipping lookups for %.1f s", request.request_id, e,
                           self._lookup_cooldown.failed())
            return None
        self._lookup_cooldown.succeeded()
        self.metrics.inc(self.metrics.lookups)
        return found

    def start_load(self, request: Request, page_ids: list[int], gpu_hit_tokens: int, num_tokens: int) -> None:
        """Fetch the blocks covering tokens [gpu_hit_tokens, gpu_hit_tokens + num_tokens) into `page_ids`."""
        state = self._requests[request.request_id]
        first = gpu_hit_tokens // self.block_size
        end = -(-(gpu_hit_tokens + num_tokens) // self.block_size)
        tiers = state.found.tiers[first:end]
        state.found = None  # admitted: a later admission (after a preemption) looks up afresh
        ppb = self.pages_per_block
        state.load_from = first
        state.load_start_tokens = gpu_hit_tokens
        state.load_end_tokens = gpu_hit_tokens + num_tokens
        self.transfer.start_load(LoadJob(
            request.request_id, [self.block_key(request, j) for j in range(first, end)],
            page_ids[first * ppb:end * ppb], skip_pages=gpu_hit_tokens // self.page_size - first * ppb,
            tiers=tiers))

    def finished_loads(self) -> list[tuple[str, int]]:
        """(request id, tokens whose KV is now in its pages) for every load that completed.

        A load that delivered fewer blocks than the lookup promised (a tier died, a checksum
        failed) ends early; the request recomputes the rest.
        """
        done = []
        for result in self.transfer.finish_loads():
            state = self._requests.get(result.request_id)
            if state is None:
                continue
            ready = max(state.load_start_tokens,
                        min((state.load_from + result.blocks_loaded) * self.block_size, state.load_end_tokens))
            # Blocks it could not deliver (a tier failed, a checksum did not match) are saved again
            # once recomputed: the store may have lost or deleted them.
            state.blocks_in_store = min(state.blocks_in_store, state.load_from + result.blocks_loaded)
            self.metrics.inc(self.metrics.loaded_tokens, ready - state.load_start_tokens)
            self.metrics.inc(self.metrics.failed_load_tokens, state.load_end_tokens - ready)
            done.append((result.request_id, ready))
        return done

    def wait_for_loads(self, timeout: float) -> None:
        self.transfer.wait_for_load(timeout)

    @property
    def has_pending_loads(self) -> bool:
        return self.transfer.num_pending_loads > 0

    def record_prefill(self, request: Request, num_computed_tokens: int) -> None:
        """A request joins the running ones with `num_computed_tokens` in its pages: count the prompt
        tokens it still computes if it was allowed to load (a request its policy or role keeps from
        loading never had the choice), and drop its lookup (a re-admission after a preemption
        looks up afresh)."""
        state = self._requests.get(request.request_id)
        if state is None:
            return
        state.found = None
        state.prefill = (time.perf_counter(), request.num_prompt_tokens - num_computed_tokens)
        if state.decision.load:
            self.metrics.inc(self.metrics.recomputed_tokens, max(0, request.num_prompt_tokens - num_computed_tokens))

    # --- saving ---------------------------------------------------------------------------------
    def save_step(self, out: SchedulerOutput, page_ids_of) -> None:
        """After a step's forward: save every block that became full (its KV is now written)."""
        jobs = []
        for sr in out.scheduled:
            state = self._requests.get(sr.request.request_id)
            if state is None or not state.decision.save:
                continue
            # With async scheduling a step computes the KV of a token the host has not read back
            # yet, so the block it completes has no key until a later step: save it then.
            full = min((sr.start + sr.num_tokens) // self.block_size,
                       len(sr.request.block_hashes) // self.pages_per_block)
            first = max(state.blocks_saved, state.blocks_in_store)
            if full > first:
                pages = page_ids_of(sr.request.request_id)
                ppb = self.pages_per_block
                jobs.append(SaveJob([self.block_key(sr.request, j) for j in range(first, full)],
                                    pages[first * ppb:full * ppb], state.decision.tiers, state.decision.ttl_s))
            state.blocks_saved = max(state.blocks_saved, full)
        if jobs:
            self.transfer.save(jobs)

    def first_token(self, request: Request) -> None:
        """A request's prefill is done (its first token is out): a sample of the engine's prefill rate."""
        state = self._requests.get(request.request_id)
        if state is not None and state.prefill is not None:
            started, tokens = state.prefill
            self.cost.observe_prefill(tokens, time.perf_counter() - started)
            state.prefill = None

    def request_finished(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self.transfer.cancel_load(request_id)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every save handed to the background sender reached the store (or failed)."""
        return self.transfer.flush(timeout)

    def close(self) -> None:
        """Send the saves already staged, then stop the transfers and disconnect from the store."""
        self.transfer.close()
        self.store.close()
