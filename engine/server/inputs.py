"""From an OpenAI request to what the engine takes: prompt token ids and SamplingParams.

Everything a client can get wrong is checked here, before the response starts, so that a bad
streaming request still gets its 400 rather than a broken event stream. Tokenizing takes seconds
for a prompt of megabytes, so callers run these functions off the event loop, and a prompt text too
long to fit whatever it says is refused before the tokenizer sees it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.sampling.params import SamplingParams
from engine.server.chat_template import render_chat
from engine.server.errors import bad_request
from engine.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

_PARAM_NAME = re.compile(r"[a-z_]+")


@dataclass
class EngineInput:
    """One request as the engine sees it."""

    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metadata: dict | None
    priority: int


def max_prompt_chars(tokenizer, max_model_len: int) -> int | None:
    """The most characters of prompt text that can still fit `max_model_len` tokens (None: no tokenizer).

    No token covers more characters of the text than its vocabulary entry has: byte-level
    vocabularies spell each byte as a character (and a character is at least one byte), SentencePiece
    ones spell characters as themselves. So a text longer than `max_model_len` times the longest entry
    cannot fit, and is refused without being tokenized; a fixed ratio would not be safe (SmolLM2 has
    an 81-character token, a newline and 80 spaces). This assumes a normalizer that does not shrink
    the text, as decoder models' tokenizers have: none, or NFC, which at most composes a letter with
    its accents (a prompt made of those is no real one).
    """
    if tokenizer is None:
        return None
    return max_model_len * max(map(len, tokenizer.get_vocab()))


def completion_input(req: CompletionRequest, tokenizer, max_model_len: int, vocab_size: int,
                     max_chars: int | None) -> EngineInput:
    """Tokenize a completion prompt (as the offline `LLM.generate` does) and check it fits."""
    prompt = req.single_prompt()
    if isinstance(prompt, str):
        _check_prompt_chars(len(prompt), max_chars, max_model_len, "prompt")
        try:
            text, token_ids = prompt, tokenizer.encode(prompt, add_special_tokens=req.add_special_tokens)
        except (TypeError, ValueError, UnicodeError) as err:   # e.g. a lone surrogate (JSON "\ud800")
            raise bad_request(f"The prompt cannot be tokenized: {type(err).__name__}.", param="prompt") from None
    else:
        text, token_ids = None, list(prompt)
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        if bad:
            raise bad_request(f"prompt token ids must lie in [0, {vocab_size}); got {bad[0]}.", param="prompt")
    _check_stop_token_ids(req, vocab_size)
    max_tokens = _fit_max_tokens(len(token_ids), req.max_tokens, max_model_len, "max_tokens")
    return EngineInput(text, token_ids, sampling_params(req, max_tokens, req.logprobs), _metadata(req), req.priority)


def chat_input(req: ChatCompletionRequest, tokenizer, max_model_len: int, vocab_size: int,
               max_chars: int | None) -> EngineInput:
    """Apply the model's chat template (as vLLM's chat endpoint does) and check the result fits."""
    _check_prompt_chars(sum(len(m.text()) for m in req.messages), max_chars, max_model_len, "messages")
    _check_stop_token_ids(req, vocab_size)
    token_ids = render_chat(tokenizer, req)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = _fit_max_tokens(len(token_ids), req.requested_max_tokens(), max_model_len, param)
    return EngineInput(None, token_ids, sampling_params(req, max_tokens, req.num_logprobs()), _metadata(req),
                       req.priority)


def _check_prompt_chars(num_chars: int, max_chars: int | None, max_model_len: int, param: str) -> None:
    if max_chars is not None and num_chars > max_chars:
        raise bad_request(
            f"This model's maximum context length (max_model_len) is {max_model_len} tokens, and no text "
            f"longer than {max_chars} characters fits in it; got {num_chars} characters in '{param}'. "
            "Please reduce the length of the prompt.", param=param, code="context_length_exceeded")


def _check_stop_token_ids(req: SamplingFields, vocab_size: int) -> None:
    # Before min_tokens the engine bans stop ids by indexing the logits: one past the vocabulary fails the step.
    bad = [t for t in req.stop_token_ids or () if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"stop_token_ids must lie in [0, {vocab_size}); got {bad[0]}.", param="stop_token_ids")


def _fit_max_tokens(num_prompt: int, max_tokens: int | None, max_model_len: int, param: str) -> int:
    """The output budget: as asked (it must fit the context) or, unset, whatever room is left."""
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"{param} must be at least 1, got {max_tokens}.", param=param)
    requested = num_prompt + (max_tokens or 1)
    if requested > max_model_len:
        completion = f"{max_tokens} in the completion" if max_tokens is not None else "at least 1 in the completion"
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{requested} tokens ({num_prompt} in the prompt, {completion}). "
            "Please reduce the length of the prompt or completion.",
            param=param if max_tokens is not None else "messages", code="context_length_exceeded")
    return max_tokens if max_tokens is not None else max_model_len - num_prompt


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """SamplingParams for the request; a value out of range is a 400 naming the parameter."""
    given = {
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p,
        "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
    }
    try:
        return SamplingParams(
            max_tokens=max_tokens, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos, min_tokens=req.min_tokens, logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
            **{name: value for name, value in given.items() if value is not None})
    except ValueError as err:
        message = str(err)
        match = _PARAM_NAME.match(message)
        raise bad_request(f"{message}.", param=match.group(0) if match else None) from None


def _metadata(req: SamplingFields) -> dict | None:
    """Caller facts the KV-offloading policy may use (issue 4: the OpenAI `user` field)."""
    return {"user": req.user} if req.user is not None else None
