"""The engine core: the step loop that ties scheduler, KV cache and model runner together.

It sees only token ids; tokenizing, detokenizing and stop strings live in the front end
(`engine.output_processor`), so nothing there can hold up a step.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.config import EngineConfig, with_batch_defaults
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.request import EngineRequest, Request
from engine.core.sched_output import SchedulerOutput
from engine.core.scheduler import Scheduler, SchedulerStats
from engine.models.config import ModelConfig, load_model_config
from engine.runner.model_runner import ModelRunner, StepHandle, StepResult
from engine.sampling.sampler import SamplingBatch
from kvstore.keys import Namespace

if TYPE_CHECKING:
    from engine.connector.connector import OffloadingConnector

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineCoreOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0


@dataclass
class StepRecord:
    """What one step computed, for the benchmarks' roofline: tokens, sequences, and the context
    tokens its attention reads (Σ over scheduled requests of their length after the step)."""

    num_tokens: int
    num_seqs: int
    context_tokens: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def _with_device_defaults(config: EngineConfig, device: torch.device) -> EngineConfig:
    if device.type != "cuda":
        return with_batch_defaults(config, device.type)
    props = torch.cuda.get_device_properties(device)
    return with_batch_defaults(config, device.type, props.total_memory, props.name)


def freeze_heap() -> None:
    """Move every object alive now out of the cyclic GC's reach, as vLLM does once its engine is up.

    A built engine leaves some 600k long-lived objects (libraries imported while loading the model,
    the model, its graphs and kernels). Each full collection walked them all: with 1000 requests
    running that idled the GPU for 0.3 s, and at batch 256 for 10-30 ms every few dozen steps.
    """
    gc.collect()
    gc.freeze()


# A thread that wants the interpreter waits up to this long for the one holding it (Python's default
# is 5 ms). The engine thread shares it with the offload transfer threads, the server's event loop
# and gRPC: on an H100 the step during which a 16k-token load was being issued took 9-11 ms for 2.4 ms
# of decode work, every 5 ms wait on a thread handing back the interpreter.
SWITCH_INTERVAL_S = 0.0005


def shorten_switch_interval() -> None:
    """Let the engine thread take the interpreter back within `SWITCH_INTERVAL_S` (process-wide)."""
    if sys.getswitchinterval() > SWITCH_INTERVAL_S:
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        logger.info("interpreter switch interval set to %.1f ms", SWITCH_INTERVAL_S * 1e3)


def thaw_heap() -> None:
    """Undo `freeze_heap` and collect: an engine dropped without `close()` frees its memory here."""
    gc.unfreeze()
    gc.collect()


def kv_namespace(cfg: ModelConfig, block_size: int) -> Namespace:
    """The namespace that pins what a KV block's bytes depend on (kvstore/keys.py says why)."""
    return Namespace(model=cfg.name, revision=cfg.revision, dtype=str(cfg.dtype).removeprefix("torch."),
                     num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                     block_size=block_size)


class EngineCore:
    """Accepts token-level requests and advances all of them one step at a time."""

    def __init__(self, config: EngineConfig) -> None:
        self.device = resolve_device(config.device)
        if self.device.type == "cuda":
            thaw_heap()  # before sizing the KV pool, so an earlier engine's memory is free
        config = _with_device_defaults(config, self.device)
        self.config = config
        self.model_config = load_model_config(config.model, config.dtype, config.load_format)
        self.max_model_len = self._max_model_len()
        self.runner = ModelRunner(self.model_config, config, self.device, self.max_model_len)
        self.namespace = kv_namespace(self.model_config, config.block_size)
        self.kv = KVCacheManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.connector = self._make_connector()
        self.scheduler = Scheduler(
            self.kv, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            long_prefill_token_threshold=config.long_prefill_token_threshold,
            max_model_len=self.max_model_len, eos_token_ids=self.model_config.eos_token_ids,
            connector=self.connector)
        self._rng = random.Random(config.seed)
        # Async scheduling: the step enqueued on the device whose tokens are not read yet.
        self._in_flight: tuple[SchedulerOutput, StepHandle] | None = None
        self._last_sampling: tuple[list[Request], SamplingBatch, bool] | None = None
        self.step_records: list[StepRecord] | None = None  # the benchmarks switch it on with []
        self._hash_seed = self.namespace.digest()
        if self.device.type == "cuda":
            freeze_heap()
            shorten_switch_interval()

    def _make_connector(self) -> OffloadingConnector | None:
        if self.config.kv_transfer_config is None:
            return None
        # Imported here: without offloading the engine needs neither gRPC nor the store's clients.
        from engine.connector.config import parse_kv_transfer_config
        from engine.connector.connector import OffloadingConnector

        cfg = parse_kv_transfer_config(self.config.kv_transfer_config)
        store_ns = kv_namespace(self.model_config, cfg.offload.block_size)
        return OffloadingConnector(cfg, self.runner.kv_cache, self.config.block_size,
                                   f"{store_ns.id}-p{self.config.block_size}",
                                   self.config.served_model_name or self.model_config.name)

    def close(self) -> None:
        """Stop background transfers and release the store connection; once dropped, the engine
        can be garbage-collected (its heap is no longer frozen)."""
        if self.connector is not None:
            self.connector.close()
        if self.device.type == "cuda":
            gc.unfreeze()

    def _max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        wanted = self.config.max_model_len or limit
        if wanted > limit:
            raise ValueError(f"max_model_len={wanted} is longer than the model's "
                             f"max_position_embeddings={limit}")
        return wanted

    def add_request(self, req: EngineRequest) -> None:
        """Queue a request; raises ValueError for a prompt the engine cannot serve."""
        n = len(req.prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens; max_model_len is {self.max_model_len}, "
                             "which must leave room for at least one generated token")
        vocab = self.model_config.vocab_size
        if min(req.prompt_token_ids) < 0 or max(req.prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        # Stop ids index the logits when min_tokens bans them: one out of range would fail the whole step.
        bad_stop = [t for t in req.sampling_params.stop_token_ids or () if t >= vocab]
        if bad_stop:
            raise ValueError(f"stop_token_ids must lie in [0, {vocab}), got {bad_stop[0]}")
        if req.request_id in self.scheduler.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        params = req.sampling_params
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        max_tokens = self.max_model_len - n
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        self.scheduler.add_request(Request(req, seed=seed, max_tokens=max_tokens,
                                           block_size=self.config.block_size,
                                           hash_seed=self._hash_seed))

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.scheduler.abort(request_ids)

    def has_unfinished_requests(self) -> bool:
        # A step still in flight whose requests all finished or were aborted has nothing left to
        # report: the next step collects and discards it.
        return self.scheduler.has_unfinished_requests()

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def step(self) -> list[EngineCoreOutput]:
        """Schedule and enqueue a step, then report each request's new token.

        With async scheduling the tokens reported are those of the previous step, read while this
        one runs on the device; without it, this step's own.
        """
        outputs = []
        if self._in_flight is not None and self._must_drain():
            outputs = self._collect(*self._in_flight)
            self._in_flight = None
        out = self.scheduler.schedule()
        handle = None
        if not out.is_empty:
            batch, banned = self._sampling_batch(out)
            handle = self.runner.execute(out, self.kv.blocks_of, batch, banned)
            if self.connector is not None:
                self.connector.save_step(out, self.kv.block_ids)
            if self.step_records is not None:
                self.step_records.append(StepRecord(
                    out.num_batched_tokens, len(out.scheduled), sum(sr.start + sr.num_tokens for sr in out.scheduled)))
        elif self._in_flight is None and self.connector is not None and self.connector.has_pending_loads:
            self.connector.wait_for_loads(timeout=0.05)
        if self._in_flight is not None:
            outputs += self._collect(*self._in_flight)
            self._in_flight = None
        if handle is not None:
            if self.config.async_scheduling:
                self._in_flight = (out, handle)
            else:
                outputs += self._collect(out, handle)
        return outputs

    def _must_drain(self) -> bool:
        """Penalties count every output token on the host: their rows need the in-flight token first."""
        return any(r.sampling_params.uses_penalties for r in self.scheduler.running)

    def _collect(self, out: SchedulerOutput, handle: StepHandle) -> list[EngineCoreOutput]:
        result = handle.result()
        updated = self.scheduler.update_from_output(out, result.token_ids)
        return self._outputs(out, result, updated)

    def _sampling_batch(self, out: SchedulerOutput) -> tuple[SamplingBatch | None, list]:
        rows = [sr.request for sr in out.scheduled if sr.sample]
        if not rows:
            return None, []
        last = self._last_sampling
        if last is not None and last[0] == rows and last[1].output_token_counts is None:
            # Steady decode: the same requests, each one token further; only the positions move.
            batch = dataclasses.replace(last[1], output_pos=last[1].output_pos + 1)
            uses_min_tokens = last[2]
        else:
            params = [r.sampling_params for r in rows]
            batch = SamplingBatch.build(
                params, [r.seed for r in rows], [r.num_planned_outputs - 1 for r in rows],
                [r.prompt_token_ids for r in rows], [r.output_token_ids for r in rows],
                self.model_config.vocab_size, self.device)
            uses_min_tokens = any(p.min_tokens for p in {id(p): p for p in params}.values())
        self._last_sampling = (rows, batch, uses_min_tokens)
        banned = []
        if not uses_min_tokens:
            return batch, banned
        for i, r in enumerate(rows):
            params = r.sampling_params
            if r.num_planned_outputs - 1 < params.min_tokens:
                stop_ids = list(params.stop_token_ids or [])
                if not params.ignore_eos:
                    stop_ids += self.model_config.eos_token_ids
                banned.append((i, stop_ids))
        return batch, banned

    def _outputs(self, out: SchedulerOutput, result: StepResult,
                 updated: list[Request]) -> list[EngineCoreOutput]:
        if result.logprobs is None:
            return [EngineCoreOutput(r.request_id, [r.output_token_ids[-1]], None, r.finish_reason, r.stop_reason,
                                     max(r.num_cached_tokens, 0)) for r in updated]
        done = {r.request_id for r in updated}
        outputs = []
        row = -1
        for sr in out.scheduled:
            if not sr.sample:
                continue
            row += 1
            r = sr.request
            if r.request_id not in done:
                continue
            logprobs = None
            if r.sampling_params.logprobs is not None and result.logprobs is not None:
                k = r.sampling_params.logprobs
                top = list(zip(result.topk_ids[row][:k], result.topk_logprobs[row][:k])) if k else []
                logprobs = [(result.logprobs[row], top)]
            outputs.append(EngineCoreOutput(
                request_id=r.request_id, new_token_ids=[r.output_token_ids[-1]], new_logprobs=logprobs,
                finish_reason=r.finish_reason,
                stop_reason=r.stop_reason, num_cached_tokens=max(r.num_cached_tokens, 0)))
        return outputs
