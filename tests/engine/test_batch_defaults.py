"""max_num_seqs / max_num_batched_tokens left unset: vLLM's defaults for the device and the usage."""

import pytest

from engine.config import EngineConfig, batch_defaults
from engine.llm import LLM
from engine.server.args import parse_serve_args
from engine.server.cli import serve_core

GiB = 1 << 30


@pytest.mark.parametrize(("usage", "device", "memory", "name", "expected"), [
    ("llm", "cuda", 80 * GiB, "NVIDIA H100 80GB HBM3", (1024, 16384)),
    ("server", "cuda", 80 * GiB, "NVIDIA H100 80GB HBM3", (1024, 8192)),
    ("llm", "cuda", 141 * GiB, "NVIDIA H200", (1024, 16384)),
    # The A100 lost throughput with large steps in vLLM's measurements: it keeps the small values.
    ("llm", "cuda", 80 * GiB, "NVIDIA A100-SXM4-80GB", (256, 8192)),
    ("server", "cuda", 24 * GiB, "NVIDIA L4", (256, 2048)),
    ("llm", "cpu", 0, "", (256, 2048)),
    ("server", "cpu", 0, "", (256, 2048)),
])
def test_defaults_by_device_and_usage(usage, device, memory, name, expected):
    assert batch_defaults(usage, device, memory, name) == expected


def test_unknown_usage_context_is_named():
    with pytest.raises(ValueError, match=r"usage_context must be one of llm, server, got 'batch'"):
        EngineConfig(usage_context="batch")


def test_offline_engine_fills_in_only_what_was_not_set(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    llm = LLM(path, device="cpu", max_model_len=64, num_gpu_blocks=16)
    assert (llm.engine.config.max_num_seqs, llm.engine.config.max_num_batched_tokens) == (256, 2048)
    llm = LLM(path, device="cpu", max_model_len=64, num_gpu_blocks=16, max_num_seqs=3)
    assert (llm.engine.config.max_num_seqs, llm.engine.config.max_num_batched_tokens) == (3, 2048)
    assert llm.engine.core.scheduler.max_num_seqs == 3


def test_server_waiting_queue_defaults_to_four_times_max_num_seqs(tiny_model_dirs):
    from engine.core.engine_core import EngineCore

    config = parse_serve_args([tiny_model_dirs["llama"], "--device", "cpu", "--max-model-len", "64",
                               "--num-gpu-blocks-override", "16", "--max-num-seqs", "5"])
    core = EngineCore(config.engine)
    app = serve_core(core, None, config)
    assert app.state.engine.max_waiting_requests == 20
