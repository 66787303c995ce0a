"""A conversation through the model's chat template, to token ids, as vLLM renders it.

The template renders text first and the text is tokenized after, so that `add_special_tokens` can
decide whether the tokenizer adds its own BOS (vLLM's default for chat is not to: the template writes
the special tokens it wants). Tool-calling conversations pass through: an assistant message's
`tool_calls`, a tool message's `tool_call_id`, the request's `tools` and `documents`.
"""

from __future__ import annotations

import json
from typing import Any

from engine.server.errors import bad_request
from engine.server.protocol import ChatMessage, ChatTemplateFields

# apply_chat_template's own parameters: as chat_template_kwargs they would change how it runs (return
# types, truncation, another template), not what the template sees.
_RESERVED_KWARGS = frozenset({
    "conversation", "chat_template", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the template reads them: content as one string, tool fields where given."""
    out = []
    for i, message in enumerate(messages):
        entry: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                 "content": message.text()}
        if message.name is not None:
            entry["name"] = message.name
        if message.role == "assistant" and message.tool_calls is not None:
            entry["tool_calls"] = [_with_parsed_arguments(call, f"messages.{i}.tool_calls.{j}")
                                   for j, call in enumerate(message.tool_calls)]
        if message.role == "tool" and message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        out.append(entry)
    return out


def _with_parsed_arguments(call: dict[str, Any], where: str) -> dict[str, Any]:
    """OpenAI sends a call's arguments as a JSON string; templates expect the object (as vLLM passes it),
    else one that writes `arguments | tojson` would quote the string a second time."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except (ValueError, RecursionError):
        raise bad_request(f"{where}.function.arguments is not valid JSON.", param=f"{where}.function.arguments") from None
    return {**call, "function": {**function, "arguments": arguments}}


def template_variables(fields: ChatTemplateFields) -> dict[str, Any]:
    """What the template is rendered with: the request's fields, then its `chat_template_kwargs` over them."""
    kwargs = fields.chat_template_kwargs or {}
    reserved = sorted(_RESERVED_KWARGS & kwargs.keys())
    if reserved:
        raise bad_request(f"chat_template_kwargs must not set '{reserved[0]}': it is not a template variable.",
                          param=f"chat_template_kwargs.{reserved[0]}")
    return {"add_generation_prompt": fields.add_generation_prompt,
            "continue_final_message": fields.continue_final_message,
            "tools": fields.tools, "documents": fields.documents, **kwargs}


def render_chat(tokenizer, fields: ChatTemplateFields) -> list[int]:
    """The conversation's prompt token ids; a conversation the template rejects is a 400."""
    messages = template_messages(fields.messages)
    variables = template_variables(fields)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **variables)
    except Exception as err:  # noqa: BLE001 - a template may raise anything on a conversation it rejects
        raise bad_request(f"The chat template rejected the messages: {err}", param="messages") from None
    try:
        return tokenizer.encode(text, add_special_tokens=fields.add_special_tokens)
    except (TypeError, ValueError, UnicodeError) as err:   # e.g. a lone surrogate (JSON "\ud800")
        raise bad_request(f"The messages cannot be tokenized: {type(err).__name__}.", param="messages") from None
