"""The engine core on a thread of its own, streaming each request's outputs to asyncio.

Only the engine thread touches the `EngineCore`: it drains an inbox of new requests and aborts,
steps, and posts the step's outputs and stats back to the event loop in one callback. It sleeps on
a condition while there is nothing to do. Detokenization and stop strings (the `OutputProcessor`)
run on the event loop, so HTTP and text work never hold up a step.

A step that raises fails the requests in the core with a 500 and the thread goes on serving new
ones: one bad request must not take the server down. Only when steps keep failing (a broken device)
or something other than an `Exception` escapes does the engine die; then every request fails, the
server reports unhealthy and `on_dead` runs (the CLI stops the process so a supervisor restarts it).

Every `log_stats_interval_s` (10 s, as vLLM) the event loop logs vLLM's stats line ("Avg prompt
throughput: ... tokens/s, ..."): at INFO while tokens were processed in this interval or the one
before (so the line showing the return to 0 appears), otherwise at DEBUG, as vLLM does. `log_stats=False`
is vLLM's --disable-log-stats.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

from engine.core.engine_core import EngineCore, EngineCoreOutput
from engine.core.request import EngineRequest
from engine.core.scheduler import SchedulerStats
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.sampling.params import SamplingParams
from engine.server.errors import APIError, bad_request, overloaded
from engine.server.inputs import max_prompt_chars
from engine.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

# Steps that fail one after another, with none succeeding in between, before the engine is declared
# dead: a failure that outlives aborting every request it touched is the device's, not a request's.
MAX_CONSECUTIVE_STEP_FAILURES = 3


class EngineDeadError(RuntimeError):
    """The engine thread failed; no request can be served any more."""


@dataclass
class _Inbox:
    """What the event loop hands the engine thread; guarded by AsyncEngine._cond."""

    new: list[EngineRequest] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    num_submitted: int = 0
    stopping: bool = False


@dataclass
class _StepFailure:
    """A step that raised, and the requests the engine thread aborted because of it."""

    request_ids: list[str]
    error: Exception


@dataclass
class _Timing:
    arrival: float
    last_token: float | None = None


class AsyncEngine:
    """Serves concurrent requests from asyncio on one `EngineCore` stepped by a dedicated thread."""

    def __init__(self, core: EngineCore, tokenizer, metrics: ServerMetrics, max_waiting_requests: int, *,
                 log_stats: bool = True, log_stats_interval_s: float = 10.0) -> None:
        self.core = core
        self.tokenizer = tokenizer
        self.metrics = metrics
        if core.connector is not None:
            metrics.attach_connector(core.connector.metrics, _tier_names(core.connector.store))
        self.log_stats = log_stats
        self.log_stats_interval_s = log_stats_interval_s
        self._stats_logger: _StatsLogger | None = None
        self._stats_task: asyncio.Task | None = None
        self.max_waiting_requests = max_waiting_requests
        self.max_model_len: int = core.max_model_len
        self.vocab_size: int = core.model_config.vocab_size
        self.max_prompt_chars = max_prompt_chars(tokenizer, self.max_model_len)
        self._output_processor = OutputProcessor(tokenizer)
        self._cond = threading.Condition()
        self._inbox = _Inbox()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._timings: dict[str, _Timing] = {}
        self._stats: SchedulerStats = core.stats()
        self._num_drained = 0
        self._num_submitted = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Engine thread only: the requests added to the core and not yet finished or aborted.
        self._in_core: set[str] = set()
        self._consecutive_failures = 0
        self.error: BaseException | None = None
        # Called on the event loop once the engine has died and its requests have failed.
        self.on_dead: Callable[[BaseException], None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume the outputs."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)
        self._thread.start()
        if self.log_stats:
            self._stats_logger = _StatsLogger(self.metrics, time.monotonic())
            self._stats_task = self._loop.create_task(self._log_stats_loop())

    async def stop(self) -> None:
        """Abort what is still in flight, then let the engine thread finish its step and exit."""
        if self._stats_task is not None:
            self._stats_task.cancel()
        in_flight = list(self._timings)
        for request_id in list(self._streams):
            self._fail(request_id, EngineDeadError("the server is shutting down"))
        with self._cond:
            self._inbox.aborts.extend(in_flight)
            self._inbox.stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self.core.close()

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    async def _log_stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.log_stats_interval_s)
            try:
                self._stats_logger.log(time.monotonic(), self._stats, self.num_waiting())
            except Exception:  # noqa: BLE001 - a broken stats line must not stop the next ones
                logger.exception("logging the engine stats failed")

    # ---- requests --------------------------------------------------------------------------------

    def num_waiting(self) -> int:
        """Requests not yet running: the core's waiting queue plus what its inbox still holds."""
        return self._stats.num_waiting + (self._num_submitted - self._num_drained)

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, metadata: dict | None = None, priority: int = 0) -> "RequestStream":
        """Admit a request (or raise: 503 when the waiting queue is full, 400 when `request_id` is already
        running) and return its output stream."""
        if not self.alive:
            raise EngineDeadError(f"the engine is not running: {self.error!r}")
        if self.num_waiting() >= self.max_waiting_requests:
            raise overloaded(self.num_waiting())
        if request_id in self._streams:
            # Clients choose ids (X-Request-Id): a second stream under one id would take the first one's outputs.
            raise bad_request(f"Request id {request_id!r} is already running; send another X-Request-Id.")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = queue
        arrival = time.monotonic()
        self._timings[request_id] = _Timing(arrival)
        self._output_processor.add_request(request_id, prompt, prompt_token_ids, params, arrival)
        self._submit(EngineRequest(request_id, prompt_token_ids, params, arrival_time=arrival, priority=priority,
                                   metadata=metadata))
        return RequestStream(self, request_id, queue)

    def _release(self, request_id: str, finished: bool) -> None:
        """A stream is closed: forget it, and abort its request in the core if it had not finished."""
        self._streams.pop(request_id, None)
        if not finished:
            self._abort(request_id)

    def _submit(self, request: EngineRequest) -> None:
        with self._cond:
            self._inbox.new.append(request)
            self._inbox.num_submitted += 1
            self._num_submitted += 1
            self._cond.notify()

    def _abort(self, request_id: str) -> None:
        if self._timings.pop(request_id, None) is None:
            return
        self._output_processor.abort(request_id)
        self.metrics.observe_finished("abort")
        with self._cond:
            self._inbox.aborts.append(request_id)
            self._cond.notify()

    def _fail(self, request_id: str, err: BaseException) -> None:
        """End one request with an error raised from its `generate` iterator."""
        self._timings.pop(request_id, None)
        self._output_processor.abort(request_id)
        queue = self._streams.get(request_id)
        if queue is not None:
            queue.put_nowait(err)

    # ---- engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._step_once():
                pass
        except BaseException as err:  # noqa: BLE001 - whatever killed the step loop ends every request
            logger.exception("engine core failed; no further requests can be served")
            self._loop.call_soon_threadsafe(self._on_engine_dead, err)

    def _step_once(self) -> bool:
        with self._cond:
            inbox = self._inbox
            while not (inbox.new or inbox.aborts or inbox.stopping or self.core.has_unfinished_requests()):
                self._cond.wait()
            new, inbox.new = inbox.new, []
            aborts, inbox.aborts = inbox.aborts, []
            num_drained, stopping = inbox.num_submitted, inbox.stopping
        rejected = []
        for request in new:
            try:
                self.core.add_request(request)
            except ValueError as err:
                rejected.append((request.request_id, err))
            else:
                self._in_core.add(request.request_id)
        # After the adds: an abort may name a request that arrived in this same drain.
        if aborts:
            self.core.abort_requests(aborts)
            self._in_core.difference_update(aborts)
        if stopping:
            return False
        failure = None
        try:
            outputs = self.core.step() if self.core.has_unfinished_requests() else []
        except Exception as err:  # noqa: BLE001 - a failed step ends its requests, not the server
            outputs, failure = [], self._abort_failed_step(err)
        else:
            self._consecutive_failures = 0
            self._in_core.difference_update(out.request_id for out in outputs if out.finish_reason is not None)
        self._loop.call_soon_threadsafe(self._on_step, outputs, self.core.stats(), rejected, failure, num_drained)
        return True

    def _abort_failed_step(self, err: Exception) -> _StepFailure:
        """Abort every request in the core: any of them may be what broke the step, and a step's
        requests share its batch, so none of them can be trusted to continue."""
        self._consecutive_failures += 1
        if self._consecutive_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
            raise EngineDeadError(f"{self._consecutive_failures} engine steps in a row failed, "
                                  f"the last with {err!r}") from err
        request_ids = list(self._in_core)
        logger.exception("an engine step failed; aborting its %d requests", len(request_ids))
        self._in_core.clear()
        self.core.abort_requests(request_ids)
        # Blocks join the prefix cache when allocated, before the forward fills them: those of the
        # failed step may hold garbage that a later request with the same prefix would read.
        self.core.kv.pool.reset_prefix_cache()
        return _StepFailure(request_ids, err)

    # ---- event loop side of a step ---------------------------------------------------------------

    def _on_step(self, outputs: list[EngineCoreOutput], stats: SchedulerStats,
                 rejected: list[tuple[str, ValueError]], failure: _StepFailure | None, num_drained: int) -> None:
        self._stats, self._num_drained = stats, num_drained
        self.metrics.observe_stats(stats)
        for request_id, err in rejected:
            self._fail(request_id, bad_request(str(err)))
        if failure is not None:
            err = failure.error
            for request_id in failure.request_ids:
                self._fail(request_id, APIError(
                    f"Internal server error: the engine step running this request failed with "
                    f"{type(err).__name__}: {err}", HTTPStatus.INTERNAL_SERVER_ERROR))
        results, to_abort = self._output_processor.process(outputs)
        if to_abort:
            with self._cond:
                self._inbox.aborts.extend(to_abort)
                self._cond.notify()
        now = time.monotonic()
        for out in results:
            self._observe_latency(out, now)
            queue = self._streams.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _observe_latency(self, out: RequestOutput, now: float) -> None:
        timing = self._timings.get(out.request_id)
        if timing is None:
            return
        if timing.last_token is None:
            self.metrics.time_to_first_token.observe(now - timing.arrival)
            self.metrics.observe_first_token(out.num_cached_tokens)
        else:
            self.metrics.inter_token_latency.observe(now - timing.last_token)
        timing.last_token = now
        if out.finished:
            del self._timings[out.request_id]
            self.metrics.e2e_request_latency.observe(now - timing.arrival)
            self.metrics.observe_finished(out.outputs[0].finish_reason or "stop")

    def _on_engine_dead(self, err: BaseException) -> None:
        self.error = err
        for request_id in list(self._streams):
            self._fail(request_id, EngineDeadError(f"the engine failed: {err!r}"))
        if self.on_dead is not None:
            self.on_dead(err)


def _tier_names(store) -> list[str]:
    """The offload store's tier names (the connector's per-tier label values); [] if it cannot say."""
    try:
        names = getattr(store, "tier_names", None)
        return list(names if names is not None else store.health())
    except Exception:  # noqa: BLE001 - the series then appear with their first sample instead
        logger.warning("could not list the offload store's tiers for /metrics", exc_info=True)
        return []


class _StatsLogger:
    """vLLM's periodic stats line, from the server metrics' running totals.

    Throughputs are over the interval since the last line; the hit rates over the last interval
    that queried the cache (vLLM's are over recent requests: neither drops to 0 while idle).
    """

    def __init__(self, metrics: ServerMetrics, now: float) -> None:
        self.metrics = metrics
        self._last_time = now
        self._last = metrics.totals()
        self._last_throughputs = (0.0, 0.0)
        self._hit_rate = 0.0
        self._external_hit_rate = 0.0

    def log(self, now: float, stats: SchedulerStats, num_waiting: int) -> None:
        totals = self.metrics.totals()
        delta = {name: totals[name] - self._last.get(name, 0) for name in totals}
        elapsed = now - self._last_time
        self._last, self._last_time = totals, now
        throughputs = tuple(delta[name] / elapsed if elapsed > 0 else 0.0
                            for name in ("prompt_tokens", "generation_tokens"))
        idle = not any(throughputs + self._last_throughputs)
        self._last_throughputs = throughputs
        if delta["prefix_cache_queries"] > 0:
            self._hit_rate = delta["prefix_cache_hits"] / delta["prefix_cache_queries"]
        if delta["external_prefix_cache_queries"] > 0:
            self._external_hit_rate = delta["external_prefix_cache_hits"] / delta["external_prefix_cache_queries"]
        parts = ["Avg prompt throughput: %.1f tokens/s", "Avg generation throughput: %.1f tokens/s",
                 "Running: %d reqs", "Waiting: %d reqs"]
        args: list[float] = [*throughputs, stats.num_running, num_waiting]
        if delta["num_preemptions"] > 0:
            parts.append("Preemptions: %d")
            args.append(delta["num_preemptions"])
        parts += ["GPU KV cache usage: %.1f%%", "Prefix cache hit rate: %.1f%%"]
        args += [stats.kv_cache_usage * 100, self._hit_rate * 100]
        if self.metrics.has_connector:
            parts.append("External prefix cache hit rate: %.1f%%")
            args.append(self._external_hit_rate * 100)
        logger.log(logging.DEBUG if idle else logging.INFO, ", ".join(parts), *args)


class RequestStream:
    """One request's cumulative outputs, the last one `finished`.

    `close()` before the end (a client that went away) aborts the request in the core, which frees
    its KV blocks; callers close it in a `finally`.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue) -> None:
        self.request_id = request_id
        self._engine = engine
        self._queue = queue
        self._done = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        # Outputs are cumulative: a consumer that fell behind only needs the newest one.
        while not self._queue.empty() and not isinstance(item, BaseException):
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            self.close(finished=True)
            raise item
        if item.finished:
            self.close(finished=True)
        return item

    async def final(self) -> RequestOutput:
        """Wait for the finished output (a non-streaming reply), closing the stream either way."""
        final = None
        try:
            async for out in self:
                final = out
        finally:
            self.close()
        return final

    def close(self, finished: bool = False) -> None:
        if not self._done:
            self._done = True
            self._engine._release(self.request_id, finished)
