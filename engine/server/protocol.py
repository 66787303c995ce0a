"""OpenAI request and response bodies (completions, chat completions, streaming chunks, models).

Requests forbid unknown fields, as OpenAI does ("Unrecognized request argument supplied"); OpenAI
fields that tierkv does not implement are accepted only at their no-op value, and anything else is
a 400 that names the field (`unsupported_field`). Sampling values are range-checked once, by
`SamplingParams`, when the request is turned into one. Every integer field is an `Int64`, so that a
value like 10**30 (JSON numbers have no size limit) is a 400 naming its field, not an overflow
inside the engine.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from engine.sampling.params import MAX_LOGPROBS
from engine.server.errors import APIError, bad_request


Int64 = Annotated[int, Field(ge=-(1 << 63), le=(1 << 63) - 1)]


class StrictRequest(BaseModel):
    """A request body: an unknown field is an error, as in OpenAI's API."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(StrictRequest):
    """`stream_options`: a last chunk carrying usage when `include_usage`."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(StrictRequest):
    """Fields shared by both endpoints; the vLLM extensions (top_k, min_p, ...) included."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int64 | None = None
    min_p: float | None = None
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int64] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: Int64 = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    n: Int64 | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's: accepted, but scheduling is first-come-first-served (vLLM's default policy); the offload
    # policy sees it (RequestInfo.priority).
    priority: Int64 = 0

    def reject_unsupported(self) -> None:
        """Raise a 400 naming the first field set to something tierkv does not implement."""
        if self.n not in (None, 1):
            raise unsupported_field("n", "only n=1 is supported")
        if self.logit_bias:
            raise unsupported_field("logit_bias", "logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true.", param="stream_options")


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[Int64] | list[str] | list[list[Int64]]
    max_tokens: Int64 | None = 16
    logprobs: Int64 | None = None
    echo: bool | None = False
    best_of: Int64 | None = None
    suffix: str | None = None
    add_special_tokens: bool = True

    def reject_unsupported(self) -> None:
        super().reject_unsupported()
        if self.best_of not in (None, 1):
            raise unsupported_field("best_of", "only best_of=1 is supported")
        if self.echo:
            raise unsupported_field("echo", "echo is not supported")
        if self.suffix:
            raise unsupported_field("suffix", "suffix is not supported")

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request, as text or token ids (batched prompts are a 400)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise unsupported_field("prompt", "only one prompt per request is supported")
            prompt = prompt[0]
        if len(prompt) == 0:
            raise bad_request("prompt must not be empty.", param="prompt")
        return prompt


class TextPart(StrictRequest):
    """One text part of a message's content (images and audio are not supported)."""

    type: Literal["text"]
    text: str


class ChatMessage(StrictRequest):
    """One message of the conversation; an assistant's `tool_calls` and a tool's `tool_call_id` go to the
    chat template (each call's JSON `arguments` parsed, as vLLM does: `chat_template.template_messages`)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatTemplateFields(StrictRequest):
    """What renders a conversation through the chat template (chat completions and /tokenize).

    `chat_template_kwargs` become template variables (Qwen3's `enable_thinking`), and win over the
    fields, as in vLLM. `add_special_tokens` is False by default, as in vLLM: the template already
    writes the special tokens it wants.
    """

    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingFields, ChatTemplateFields):
    """POST /v1/chat/completions."""

    max_tokens: Int64 | None = None
    max_completion_tokens: Int64 | None = None
    logprobs: bool | None = False
    top_logprobs: Int64 | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    def reject_unsupported(self) -> None:
        super().reject_unsupported()
        if self.tools and self.tool_choice != "none":
            # vLLM without --enable-auto-tool-choice answers the same: tools reach the template only
            # when the model is told not to call them, since no parser would find calls in the reply.
            raise unsupported_field("tools", 'tool calling is not supported; tools reach the chat template '
                                             'only with tool_choice "none"')
        if self.tool_choice not in (None, "none", "auto"):
            raise unsupported_field("tool_choice", "tool calling is not supported")
        if self.functions or self.function_call not in (None, "none", "auto"):
            raise unsupported_field("functions" if self.functions else "function_call", "function calling is not supported")
        if self.response_format not in (None, {"type": "text"}):
            raise unsupported_field("response_format", "only response_format {\"type\": \"text\"} is supported")
        if self.reasoning_effort is not None:
            raise unsupported_field("reasoning_effort", "reasoning_effort is not supported")
        if self.modalities not in (None, ["text"]) or self.audio is not None:
            raise unsupported_field("modalities" if self.audio is None else "audio", "only text output is supported")
        if self.prediction is not None:
            raise unsupported_field("prediction", "predicted outputs are not supported")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise bad_request("top_logprobs requires logprobs to be true.", param="top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise bad_request(
                    f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.top_logprobs}.", param="top_logprobs"
                )
        if self.continue_final_message and self.add_generation_prompt:
            raise bad_request(
                "continue_final_message and add_generation_prompt cannot both be true.", param="continue_final_message"
            )

    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` (the current name) wins over the deprecated `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        """How many top alternatives to return per token, or None when logprobs are off."""
        return (self.top_logprobs or 0) if self.logprobs else None


def unsupported_field(field: str, why: str) -> APIError:
    """A 400 for an OpenAI field tierkv does not implement."""
    return bad_request(f"Unsupported value for '{field}': {why}.", param=field, code="unsupported_parameter")


# ---- responses -----------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    """Token counts of one request; `cached_tokens` are prompt tokens served from the prefix cache."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> "Usage":
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


class CompletionLogprobs(BaseModel):
    """The legacy completions logprobs shape."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or (object "text_completion" as well) one streamed chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    system_fingerprint: str | None = None
    usage: Usage


class DeltaMessage(BaseModel):
    """The increment of a streamed chat message; fields not in this increment are left out."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="plain")
    def _only_set(self) -> dict[str, Any]:
        return {key: value for key, value in (("role", self.role), ("content", self.content)) if value is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tierkv"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
