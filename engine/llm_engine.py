"""Synchronous engine: tokenizer + engine core + output processor in one process."""

from __future__ import annotations

import itertools
from typing import Any

from engine.config import EngineConfig
from engine.core.engine_core import EngineCore
from engine.core.request import EngineRequest
from engine.models.loader import load_tokenizer
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.sampling.params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


class LLMEngine:
    """Adds text or token prompts and steps the core, returning `RequestOutput`s with text."""

    def __init__(self, config: EngineConfig) -> None:
        self.core = EngineCore(config)
        self.config = self.core.config  # with the device's batch defaults filled in
        self.model_config = self.core.model_config
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(self.model_config)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """A prompt is a string, a list of token ids, or {"prompt": ...} / {"prompt_token_ids": [...]}."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(map(int, prompt["prompt_token_ids"]))
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; this engine runs with skip_tokenizer_init")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"a prompt must be a str, a list of token ids or a dict, got {type(prompt).__name__}")

    def add_request(self, prompt: PromptType, params: SamplingParams, request_id: str | None = None,
                    priority: int = 0, metadata: dict | None = None, final_only: bool = False) -> str:
        request_id = request_id if request_id is not None else str(next(self._ids))
        text, token_ids = self.tokenize(prompt)
        req = EngineRequest(request_id, token_ids, params, priority=priority, metadata=metadata)
        self.core.add_request(req)
        self.output_processor.add_request(request_id, text, token_ids, params, req.arrival_time, final_only)
        return request_id

    def abort_request(self, request_ids: list[str]) -> None:
        self.core.abort_requests(request_ids)
        for rid in request_ids:
            self.output_processor.abort(rid)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        outputs, to_abort = self.output_processor.process(self.core.step())
        if to_abort:
            self.core.abort_requests(to_abort)
        return outputs
