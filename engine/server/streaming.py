"""Turn a request's cumulative outputs into increments: new text, new tokens, their logprobs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.outputs import Logprob, RequestOutput


@dataclass
class Delta:
    """What one output added since the previous one."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    text_offset: int
    finish_reason: str | None
    stop_reason: int | str | None
    output: RequestOutput


async def deltas(outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[Delta]:
    """Yield each output's increment; outputs that added nothing visible and did not finish are skipped."""
    num_chars = num_tokens = 0
    async for out in outputs:
        completion = out.outputs[0]
        text = completion.text[num_chars:]
        token_ids = completion.token_ids[num_tokens:]
        logprobs = completion.logprobs[num_tokens:] if completion.logprobs is not None else None
        if text or completion.finish_reason is not None or (logprobs and token_ids):
            yield Delta(text, token_ids, logprobs, num_chars, completion.finish_reason, completion.stop_reason, out)
            num_chars, num_tokens = len(completion.text), len(completion.token_ids)
