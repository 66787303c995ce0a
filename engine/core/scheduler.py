"""Continuous batching with chunked prefill under a per-step token budget.

Every step: running requests first (a decode is one token, an unfinished prefill gets the next
chunk), then waiting requests in arrival order while budget, sequence slots and KV blocks last.
With `long_prefill_token_threshold` > 0 (vLLM's knob) no prefill computes more than that many
tokens in one step, so a long prompt arriving beside running decodes is spread over several
smaller steps instead of one step that delays every decode's next token.
When a running request cannot get a block, the most recently admitted request is preempted: its
blocks are freed and it goes back to the front of the queue to be recomputed later (its output so
far is kept, so it resumes where it stopped).

With an offloading connector, a request whose prefix the store holds beyond the GPU prefix-cache
hit gets its pages at admission and waits (WAITING_FOR_KV, using no token budget) while they load
in the background; other requests keep running. When the load is done it joins the running
requests and computes only the tokens after what was loaded.

Async scheduling: a step is planned while the previous one still runs on the device. Scheduling a
request advances its `num_computed_tokens` at once and counts the token its step will sample as
pending (`Request.num_pending_outputs`); the next plan treats that token as known (its id reaches
the next step's inputs on the device). `update_from_output` later appends the real token and
applies stop conditions one step late: a token sampled after a stop is discarded.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.core.kv_cache_manager import KVCacheManager
from engine.core.request import FINISHED, Request, RequestStatus
from engine.core.sched_output import ScheduledRequest, SchedulerOutput

if TYPE_CHECKING:
    from engine.connector.connector import OffloadingConnector

logger = logging.getLogger(__name__)


@dataclass
class SchedulerStats:
    """Counters and gauges the server exports under vLLM's metric names."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    computed_tokens: int


class Scheduler:
    """Decides, each step, which requests run and how many tokens each computes."""

    def __init__(self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: Iterable[int],
                 connector: OffloadingConnector | None = None, long_prefill_token_threshold: int = 0) -> None:
        self.kv = kv
        self.connector = connector
        self.loading: dict[str, Request] = {}
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.computed_tokens = 0  # tokens run through the model, recomputation included
        self._freed: list[str] = []

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    def abort(self, request_ids: Iterable[str]) -> list[Request]:
        """Finish the named requests now and free their blocks; unknown ids are ignored."""
        aborted = []
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            elif request.status == RequestStatus.WAITING_FOR_KV:
                del self.loading[rid]
            else:
                self.waiting.remove(request)
            self._finish(request, RequestStatus.FINISHED_ABORTED)
            aborted.append(request)
        return aborted

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._plan(out)
        # Slots are released by the step that next reaches the runner; an empty plan never does.
        if out.scheduled:
            out.freed_request_ids, self._freed = self._freed, []
        else:
            self._freed.extend(out.preempted)
        return out

    def _plan(self, out: SchedulerOutput) -> None:
        if self.connector is not None:
            self._admit_loaded()
        budget = self.max_num_batched_tokens
        # A request's tokens this step: never over the budget left, nor over the threshold when one is
        # set (a decode's single token never reaches it). Off, the whole budget caps, as before.
        cap = self.long_prefill_token_threshold or budget
        max_model_len = self.max_model_len
        allocate = self.kv.allocate_slots
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            pending = request.num_pending_outputs
            planned = len(request.all_token_ids) + pending
            if pending and (len(request.output_token_ids) + pending >= request.max_tokens
                            or planned >= max_model_len):
                i += 1  # every token it may produce is sampled already and only waits to be read
                continue
            n = min(planned - request.num_computed_tokens, budget, cap)
            if not allocate(request, n) and not self._allocate_or_preempt(request, n, out):
                break
            self._add(out, request, n)
            budget -= n
            i += 1
        if out.preempted:
            return
        while self.waiting and budget > 0 and len(self.running) + len(self.loading) < self.max_num_seqs:
            request = self.waiting[0]
            if request.num_pending_outputs:
                break  # preempted while its last token was in flight: admit it once that token is known
            hits = self.kv.get_computed_blocks(request)
            num_hit = len(hits) * self.kv.block_size
            to_load = self.connector.num_tokens_to_load(request, num_hit) if self.connector else 0
            if to_load:
                if not self.kv.allocate_slots(request, to_load, hits, register=False):
                    break
                self._admitted(request, num_hit)
                request.status = RequestStatus.WAITING_FOR_KV
                self.loading[request.request_id] = request
                self.connector.start_load(request, self.kv.block_ids(request.request_id), num_hit, to_load)
                continue
            n = min(request.num_tokens - num_hit, budget, cap)
            if not self.kv.allocate_slots(request, n, hits):
                break
            self._admitted(request, num_hit)
            if self.connector is not None:
                self.connector.record_prefill(request, num_hit)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add(out, request, n)
            budget -= n

    def _admitted(self, request: Request, num_hit: int) -> None:
        self.waiting.popleft()
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit
            self.prompt_tokens += request.num_prompt_tokens
        self.kv.record_prefix_lookup(request.num_tokens, num_hit)
        request.num_computed_tokens = num_hit

    def _admit_loaded(self) -> None:
        """Requests whose load finished join the running ones, resuming after what was loaded."""
        for request_id, ready in self.connector.finished_loads():
            request = self.loading.pop(request_id, None)
            if request is None:
                continue
            request.num_cached_tokens = max(request.num_cached_tokens, ready)
            request.num_computed_tokens = ready
            request.status = RequestStatus.RUNNING
            self.connector.record_prefill(request, ready)
            self.running.append(request)

    def _allocate_or_preempt(self, request: Request, n: int, out: SchedulerOutput) -> bool:
        while not self.kv.allocate_slots(request, n):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        logger.debug("preempted %s (%d tokens) for lack of KV blocks", request.request_id, request.num_tokens)

    def _add(self, out: SchedulerOutput, request: Request, n: int) -> None:
        start = request.num_computed_tokens
        sample = start + n == len(request.all_token_ids) + request.num_pending_outputs
        request.num_computed_tokens = start + n
        if sample:
            request.num_pending_outputs += 1
        out.scheduled.append(ScheduledRequest(request, start, n, sample))
        out.num_batched_tokens += n
        self.computed_tokens += n

    def update_from_output(self, out: SchedulerOutput, sampled: list[int]) -> list[Request]:
        """Take in a step's sampled tokens, one per sampling request of `out`, in order.

        Returns the requests that got a new token (finished ones included, blocks freed). A request
        that finished or was aborted after this step was planned gets nothing: its token is discarded.
        """
        updated = []
        it = iter(sampled)
        for sr in out.scheduled:
            if not sr.sample:
                continue
            token = next(it)
            request = sr.request
            if request.status in FINISHED:
                continue
            request.num_pending_outputs -= 1
            request.append_output_token(token)
            if self.connector is not None and len(request.output_token_ids) == 1:
                self.connector.first_token(request)
            status = self._check_stop(request, token)
            if status is not None:
                # A request preempted while this step ran waits in the queue; it can finish there.
                (self.running if request.status == RequestStatus.RUNNING else self.waiting).remove(request)
                self._finish(request, status)
            updated.append(request)
        self.generation_tokens += len(updated)
        return updated

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        num_outputs = len(request.output_token_ids)
        if num_outputs >= params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if params.stop_token_ids and token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if num_outputs >= request.max_tokens or len(request.all_token_ids) >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self._freed.append(request.request_id)
        self.kv.free(request)
        if self.connector is not None:
            self.connector.request_finished(request.request_id)
        del self.requests[request.request_id]

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting) + len(self.loading), kv_cache_usage=self.kv.usage,
            prefix_cache_queries=self.kv.prefix_queries, prefix_cache_hits=self.kv.prefix_hits,
            num_preemptions=self.num_preemptions, prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens, computed_tokens=self.computed_tokens)
