"""POST /v1/chat/completions: a conversation through the model's chat template, whole or streamed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from engine.server import sse
from engine.server.async_engine import AsyncEngine, RequestStream
from engine.server.completions import usage_of
from engine.server.errors import APIError
from engine.server.inputs import chat_input
from engine.server.logprobs import chat_logprobs
from engine.server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                    ChatCompletionRequest, ChatCompletionResponse, DeltaMessage)
from engine.server.streaming import deltas

logger = logging.getLogger(__name__)


async def start_chat(req: ChatCompletionRequest, engine: AsyncEngine, base_id: str) -> tuple[str, RequestStream]:
    """Check and admit the request as `chatcmpl-<base_id>`; every client mistake raises here, before any
    response starts."""
    req.reject_unsupported()
    # On a worker thread: the template and tokenizer take seconds on a long prompt, which would
    # stall every other request (and /health) on the event loop.
    inp = await asyncio.to_thread(chat_input, req, engine.tokenizer, engine.max_model_len, engine.vocab_size,
                                  engine.max_prompt_chars)
    request_id = f"chatcmpl-{base_id}"
    return request_id, engine.add_request(request_id, inp.prompt, inp.prompt_token_ids, inp.params, inp.metadata,
                                         inp.priority)


async def chat(req: ChatCompletionRequest, engine: AsyncEngine, model: str, request_id: str,
               stream: RequestStream) -> ChatCompletionResponse:
    """Wait for the whole reply."""
    final = await stream.final()
    completion = final.outputs[0]
    logprobs = None
    if completion.logprobs is not None:
        logprobs = chat_logprobs(completion.token_ids, completion.logprobs, engine.tokenizer)
    choice = ChatChoice(message=AssistantMessage(content=completion.text), logprobs=logprobs,
                        finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)
    return ChatCompletionResponse(id=request_id, model=model, choices=[choice], usage=usage_of(final))


async def stream_chat(req: ChatCompletionRequest, engine: AsyncEngine, model: str, request_id: str,
                      stream: RequestStream) -> AsyncIterator[str]:
    """The reply as SSE chunks: the role first, then content, a usage chunk last when asked."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    every_chunk_usage = include_usage and req.stream_options.continuous_usage_stats

    def chunk(choice: ChatChunkChoice | None, usage=None) -> str:
        return sse.event(ChatCompletionChunk(id=request_id, model=model, choices=[choice] if choice else [],
                                             usage=usage))

    final = None
    try:
        yield chunk(ChatChunkChoice(delta=DeltaMessage(role="assistant", content="")))
        async for delta in deltas(stream):
            final = delta.output
            logprobs = None
            if delta.logprobs is not None:
                logprobs = chat_logprobs(delta.token_ids, delta.logprobs, engine.tokenizer)
            choice = ChatChunkChoice(delta=DeltaMessage(content=delta.text or None), logprobs=logprobs,
                                     finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)
            yield chunk(choice, usage_of(final) if every_chunk_usage else None)
        if include_usage:
            yield chunk(None, usage_of(final))
    except APIError as err:
        yield sse.event(err.body())
    except Exception as err:  # noqa: BLE001 - the response has started: report in-band, then end it
        logger.exception("chat completion %s failed mid-stream", request_id)
        yield sse.event(APIError(f"Internal server error: {err}", 500).body())
    finally:
        stream.close()
    yield sse.DONE
