"""A tiny model whose tokenizer adds a BOS token and whose chat template shows every variable it gets:
`tools`, `documents`, `enable_thinking`, tool calls and tool results. Token i is byte i (see
tests/engine/tiny_models.py), so a test can spell out the exact prompt token ids."""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers.processors import TemplateProcessing

from tests.engine.tiny_models import SPECIAL_TOKENS, make_tiny_model, make_tokenizer

BOS = "<|endoftext|>"
TOOL_TEMPLATE = (
    "{% if documents %}[docs:{% for d in documents %} {{ d['title'] }}{% endfor %}]\n{% endif %}"
    "{% if tools %}[tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}]\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}"
    "{{ (' ' + m['tool_call_id']) if m['tool_call_id'] is defined else '' }}\n{{ m['content'] }}"
    "{% for c in m['tool_calls'] or [] %}<call>{{ c['function']['name'] }}"
    "{{ c['function']['arguments']['city'] }}</call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>\n{% endif %}{% endif %}"
)
_SPECIAL = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")


def make_template_model(tmp_path: Path) -> str:
    """The tiny llama with a BOS-adding tokenizer and `TOOL_TEMPLATE`; returns its directory."""
    model_dir = make_tiny_model(tmp_path, "llama")
    tokenizer = make_tokenizer()
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS) + 256)])
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    return model_dir


def token_ids(text: str) -> list[int]:
    """`text` as the byte tokenizer encodes it without special tokens added: a special token's id, else bytes."""
    ids: list[int] = []
    for piece in _SPECIAL.split(text):
        ids += [256 + SPECIAL_TOKENS.index(piece)] if piece in SPECIAL_TOKENS else list(piece.encode())
    return ids
