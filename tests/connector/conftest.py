"""Connector test fixtures: one tiny fp32 model long enough for 2k+ token prompts, and its cold outputs."""

from __future__ import annotations

import pytest

from tests.connector.offload_helpers import generate, make_llm
from tests.engine.tiny_models import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer random Llama (fp32, 4096 positions): a 256-token block is 128 KiB."""
    return make_tiny_model(tmp_path_factory.mktemp("offload_model"), "llama", max_position_embeddings=4096)


@pytest.fixture(scope="session")
def cold(tiny_model):
    """cold(prompt) -> greedy token ids from an engine with no connector (the reference)."""
    llm = make_llm(tiny_model, None, enable_prefix_caching=False)
    memo: dict[tuple[int, ...], list[int]] = {}

    def run(prompt: list[int]) -> list[int]:
        key = tuple(prompt)
        if key not in memo:
            memo[key] = generate(llm, prompt)
        return memo[key]

    return run
