"""Per-token logprobs in the two OpenAI shapes: chat's `content` list and completions' columns."""

from __future__ import annotations

from engine.outputs import Logprob
from engine.server.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


def _token_text(entry: dict[int, Logprob], token_id: int, tokenizer) -> str:
    candidate = entry.get(token_id)
    if candidate is not None and candidate.decoded_token is not None:
        return candidate.decoded_token
    return tokenizer.decode([token_id])


def _ranked(entry: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    """The top alternatives of one position, best first (the sampled token has no rank if not among them)."""
    return sorted(((tid, lp) for tid, lp in entry.items() if lp.rank is not None), key=lambda item: item[1].rank)


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], tokenizer) -> ChatLogprobs:
    """`choices[].logprobs` of a chat completion for these generated tokens."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        text = _token_text(entry, token_id, tokenizer)
        top = [TopLogprob(token=_token_text(entry, tid, tokenizer), logprob=lp.logprob,
                          bytes=list(_token_text(entry, tid, tokenizer).encode()))
               for tid, lp in _ranked(entry)]
        content.append(TokenLogprob(token=text, logprob=entry[token_id].logprob, bytes=list(text.encode()),
                                    top_logprobs=top))
    return ChatLogprobs(content=content)


def completion_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], tokenizer,
                        text_offset: int = 0) -> CompletionLogprobs:
    """`choices[].logprobs` of a legacy completion; `text_offset` is where these tokens' text starts."""
    out = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        text = _token_text(entry, token_id, tokenizer)
        out.tokens.append(text)
        out.token_logprobs.append(entry[token_id].logprob)
        out.top_logprobs.append({_token_text(entry, tid, tokenizer): lp.logprob for tid, lp in _ranked(entry)})
        out.text_offset.append(text_offset)
        text_offset += len(text)
    return out
