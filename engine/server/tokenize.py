"""POST /tokenize and /detokenize, with vLLM's bodies.

`/tokenize` takes a `prompt` (tokenized as /v1/completions does) or `messages` (rendered through the chat
template as /v1/chat/completions does), so a client can count a prompt's tokens exactly as the server
will; `/detokenize` turns token ids back into text. Neither checks the prompt against `max_model_len`
(vLLM's do not): the answer carries `max_model_len` for the client to compare.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Discriminator, RootModel, Tag

from engine.server.chat_template import render_chat
from engine.server.errors import bad_request
from engine.server.protocol import ChatTemplateFields, Int64, StrictRequest


class TokenizeCompletionRequest(StrictRequest):
    """POST /tokenize with a prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(ChatTemplateFields):
    """POST /tokenize with a conversation."""

    model: str | None = None
    return_token_strs: bool = False


def _tokenize_kind(body: Any) -> str:
    return "TokenizeChatRequest" if isinstance(body, dict) and "messages" in body else "TokenizeCompletionRequest"


class TokenizeRequest(RootModel):
    """Either body of POST /tokenize: one with `messages` is a conversation, any other a prompt."""

    # The tags are the class names: from_validation_error leaves such union tags out of the `param` it names.
    root: Annotated[Annotated[TokenizeChatRequest, Tag("TokenizeChatRequest")]
                    | Annotated[TokenizeCompletionRequest, Tag("TokenizeCompletionRequest")],
                    Discriminator(_tokenize_kind)]


class TokenizeResponse(BaseModel):
    """The prompt's token ids; `token_strs` (the tokenizer's spelling of each) only when asked for."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(StrictRequest):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[Int64]


class DetokenizeResponse(BaseModel):
    prompt: str


def tokenize(req: TokenizeChatRequest | TokenizeCompletionRequest, tokenizer, max_model_len: int) -> TokenizeResponse:
    """Token ids of the prompt or conversation, as the completion endpoints would build them."""
    if isinstance(req, TokenizeChatRequest):
        token_ids = render_chat(tokenizer, req)
    else:
        try:
            token_ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        except (TypeError, ValueError, UnicodeError) as err:   # e.g. a lone surrogate (JSON "\ud800")
            raise bad_request(f"The prompt cannot be tokenized: {type(err).__name__}.", param="prompt") from None
    token_strs = tokenizer.convert_ids_to_tokens(token_ids) if req.return_token_strs else None
    return TokenizeResponse(count=len(token_ids), max_model_len=max_model_len, tokens=token_ids, token_strs=token_strs)


def detokenize(req: DetokenizeRequest, tokenizer) -> DetokenizeResponse:
    """The text of `req.tokens`; an id outside the tokenizer's vocabulary is a 400."""
    vocab_size = len(tokenizer)
    bad = [t for t in req.tokens if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"tokens must lie in [0, {vocab_size}); got {bad[0]}.", param="tokens")
    return DetokenizeResponse(prompt=tokenizer.decode(req.tokens))
