"""Front-end side of generation: incremental detokenization and stop strings.

Runs outside the engine core's step loop. Text is produced incrementally (only the newest tokens
are decoded each time) and, while a stop string could still be forming, its possible prefix is
held back so that a streamed character never has to be taken back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.core.engine_core import EngineCoreOutput
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.sampling.params import SamplingParams

# Prompt tokens decoded together with the first output tokens, so tokenizers that drop a
# word's leading space at the start of a decode produce the same text as in context.
_CONTEXT_TOKENS = 5


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    window: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    final_only: bool = False  # the caller wants the finished output alone (the offline API)


class OutputProcessor:
    """Turns the core's token outputs into `RequestOutput`s with text."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float | None = None, final_only: bool = False) -> None:
        """Track a request; with `final_only`, `process` reports it once, when it finishes."""
        if self.tokenizer is None and params.stop:
            raise ValueError("stop strings need a tokenizer; this engine runs with skip_tokenizer_init")
        context = prompt_token_ids[-_CONTEXT_TOKENS:]
        self._states[request_id] = _RequestState(
            request_id, prompt, list(prompt_token_ids), params, arrival_time or time.monotonic(),
            window=list(context), prefix_offset=0, read_offset=len(context),
            logprobs=[] if params.logprobs is not None else None,
            cumulative_logprob=0.0 if params.logprobs is not None else None, final_only=final_only)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Forget a request; returns its final output marked "abort" if it was known."""
        state = self._states.pop(request_id, None)
        if state is None:
            return None
        state.finish_reason = "abort"
        return self._make_output(state)

    def has(self, request_id: str) -> bool:
        return request_id in self._states

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's outputs. Returns the request outputs and the ids the core must abort
        (requests a stop string finished, which the core does not know about)."""
        results, to_abort = [], []
        now = time.monotonic()
        for out in outputs:
            state = self._states.get(out.request_id)
            if state is None:
                continue
            state.first_token_time = state.first_token_time or now
            state.last_token_time = now
            stopped = self._append(state, out)
            if stopped and out.finish_reason is None:
                to_abort.append(out.request_id)
            if state.finish_reason is None and out.finish_reason is not None:
                state.finish_reason, state.stop_reason = out.finish_reason, out.stop_reason
            if state.finish_reason is not None or not state.final_only:
                results.append(self._make_output(state, out.num_cached_tokens))
            if state.finish_reason is not None:
                del self._states[out.request_id]
        return results, to_abort

    def _append(self, state: _RequestState, out: EngineCoreOutput) -> bool:
        if self.tokenizer is None and state.logprobs is None:
            # No text and no logprobs to build: the tokens are all there is (stop strings need a
            # tokenizer, refused at add_request).
            state.token_ids += out.new_token_ids
            return False
        params = state.params
        for i, token in enumerate(out.new_token_ids):
            state.token_ids.append(token)
            if out.new_logprobs is not None and state.logprobs is not None:
                self._append_logprobs(state, token, *out.new_logprobs[i])
            hide = (not params.ignore_eos and out.finish_reason == "stop" and out.stop_reason is None
                    and i == len(out.new_token_ids) - 1) or token == out.stop_reason
            if not hide:
                start = len(state.text)
                state.text += self._decode_next(state, token)
                if params.stop and self._check_stop_strings(state, start):
                    return True
        return False

    def _decode_next(self, state: _RequestState, token: int) -> str:
        if self.tokenizer is None:
            return ""
        skip = state.params.skip_special_tokens
        state.window.append(token)
        prefix = self.tokenizer.decode(state.window[state.prefix_offset:state.read_offset],
                                       skip_special_tokens=skip)
        full = self.tokenizer.decode(state.window[state.prefix_offset:], skip_special_tokens=skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            state.prefix_offset, state.read_offset = state.read_offset, len(state.window)
            return full[len(prefix):]
        return ""

    def _check_stop_strings(self, state: _RequestState, start: int) -> bool:
        longest = max(len(s) for s in state.params.stop)
        search_from = max(0, start - longest + 1)
        found = [(state.text.find(s, search_from), s) for s in state.params.stop]
        found = [(idx, s) for idx, s in found if idx >= 0]
        if not found:
            return False
        idx, stop = min(found)
        end = idx + len(stop) if state.params.include_stop_str_in_output else idx
        state.text = state.text[:end]
        state.finish_reason, state.stop_reason = "stop", stop
        return True

    def _token_text(self, token: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token])

    def _append_logprobs(self, state: _RequestState, token: int, logprob: float,
                         top: list[tuple[int, float]]) -> None:
        entry = {tid: Logprob(lp, rank=r + 1, decoded_token=self._token_text(tid))
                 for r, (tid, lp) in enumerate(top)}
        if token not in entry:
            entry[token] = Logprob(logprob, rank=None, decoded_token=self._token_text(token))
        state.logprobs.append(entry)
        state.cumulative_logprob += logprob

    def _visible_text(self, state: _RequestState) -> str:
        params = state.params
        if state.finish_reason is not None or not params.stop or params.include_stop_str_in_output:
            return state.text
        hold = max(len(s) for s in params.stop) - 1
        return state.text[:max(0, len(state.text) - hold)] if hold else state.text

    def _make_output(self, state: _RequestState, num_cached_tokens: int = 0) -> RequestOutput:
        completion = CompletionOutput(
            index=0, text=self._visible_text(state), token_ids=list(state.token_ids),
            cumulative_logprob=state.cumulative_logprob,
            logprobs=list(state.logprobs) if state.logprobs is not None else None,
            finish_reason=state.finish_reason, stop_reason=state.stop_reason)
        metrics = {"arrival_time": state.arrival_time}
        if state.first_token_time is not None:
            metrics["first_token_time"] = state.first_token_time
            metrics["last_token_time"] = state.last_token_time
        return RequestOutput(request_id=state.request_id, prompt=state.prompt,
                             prompt_token_ids=state.prompt_token_ids, outputs=[completion],
                             finished=state.finish_reason is not None,
                             num_cached_tokens=num_cached_tokens, metrics=metrics)
