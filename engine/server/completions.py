"""POST /v1/completions: one prompt in, its completion out, whole or streamed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from engine.outputs import RequestOutput
from engine.server import sse
from engine.server.async_engine import AsyncEngine, RequestStream
from engine.server.errors import APIError
from engine.server.inputs import completion_input
from engine.server.logprobs import completion_logprobs
from engine.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from engine.server.streaming import deltas

logger = logging.getLogger(__name__)


async def start_completion(req: CompletionRequest, engine: AsyncEngine, base_id: str) -> tuple[str, RequestStream]:
    """Check and admit the request as `cmpl-<base_id>`; every client mistake raises here, before any
    response starts."""
    req.reject_unsupported()
    # On a worker thread: tokenizing a long prompt takes seconds, which would stall every other
    # request (and /health) on the event loop.
    inp = await asyncio.to_thread(completion_input, req, engine.tokenizer, engine.max_model_len,
                                  engine.vocab_size, engine.max_prompt_chars)
    request_id = f"cmpl-{base_id}"
    return request_id, engine.add_request(request_id, inp.prompt, inp.prompt_token_ids, inp.params, inp.metadata,
                                         inp.priority)


def usage_of(out: RequestOutput) -> Usage:
    return Usage.of(len(out.prompt_token_ids), len(out.outputs[0].token_ids), out.num_cached_tokens)


async def complete(req: CompletionRequest, engine: AsyncEngine, model: str, request_id: str,
                   stream: RequestStream) -> CompletionResponse:
    """Wait for the whole completion."""
    final = await stream.final()
    completion = final.outputs[0]
    logprobs = None
    if completion.logprobs is not None:
        logprobs = completion_logprobs(completion.token_ids, completion.logprobs, engine.tokenizer)
    choice = CompletionChoice(text=completion.text, logprobs=logprobs, finish_reason=completion.finish_reason,
                              stop_reason=completion.stop_reason)
    return CompletionResponse(id=request_id, model=model, choices=[choice], usage=usage_of(final))


async def stream_completion(req: CompletionRequest, engine: AsyncEngine, model: str, request_id: str,
                            stream: RequestStream) -> AsyncIterator[str]:
    """The completion as SSE events, a usage event last when `stream_options.include_usage`."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    every_chunk_usage = include_usage and req.stream_options.continuous_usage_stats
    final = None
    try:
        async for delta in deltas(stream):
            final = delta.output
            logprobs = None
            if delta.logprobs is not None:
                logprobs = completion_logprobs(delta.token_ids, delta.logprobs, engine.tokenizer, delta.text_offset)
            choice = CompletionChoice(text=delta.text, logprobs=logprobs, finish_reason=delta.finish_reason,
                                      stop_reason=delta.stop_reason)
            yield sse.event(CompletionResponse(id=request_id, model=model, choices=[choice],
                                               usage=usage_of(final) if every_chunk_usage else None))
        if include_usage:
            yield sse.event(CompletionResponse(id=request_id, model=model, choices=[], usage=usage_of(final)))
    except APIError as err:
        yield sse.event(err.body())
    except Exception as err:  # noqa: BLE001 - the response has started: report in-band, then end it
        logger.exception("completion %s failed mid-stream", request_id)
        yield sse.event(APIError(f"Internal server error: {err}", 500).body())
    finally:
        stream.close()
    yield sse.DONE
