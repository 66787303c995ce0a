import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine.tiny_models import make_tiny_model

ARCHS = ("llama", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    """One tiny random-weight HF model directory per architecture, saved once per session."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def hf_models(tiny_model_dirs):
    return {arch: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for arch, path in tiny_model_dirs.items()}
