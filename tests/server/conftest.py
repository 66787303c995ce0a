"""Real servers on loopback ports: uvicorn in a thread, serving the tiny random model or SmolLM2."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from engine import LLM, SamplingParams
from engine.server.args import ServeConfig, parse_serve_args
from engine.server.cli import build_server, serve_core, uvicorn_config
from tests.engine.tiny_models import make_tiny_model
from tests.server.template_model import make_template_model

# Small KV pools: the tests share 2 cores and 24 GiB with other suites.
TINY_FLAGS = ("--max-model-len", "1024", "--num-gpu-blocks-override", "256", "--seed", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A uvicorn server on 127.0.0.1 in a daemon thread; `stop()` shuts it down gracefully."""

    def __init__(self, make_app: Callable[[ServeConfig], FastAPI], argv: list[str]) -> None:
        self.port = free_port()
        config = parse_serve_args([*argv, "--host", "127.0.0.1", "--port", str(self.port),
                                   "--uvicorn-log-level", "warning"])
        self.server = uvicorn.Server(uvicorn_config(make_app(config), config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.base_url = f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=120, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("server_tiny") / "llama", "llama")


@pytest.fixture(scope="session")
def start_tiny_server(tiny_model_dir):
    """Start a tiny-model server with extra flags; every server started is stopped at the end."""
    servers: list[RunningServer] = []

    def start(*flags: str) -> RunningServer:
        argv = [tiny_model_dir, *TINY_FLAGS, *flags]
        server = RunningServer(build_server, argv)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def tiny_server(start_tiny_server) -> RunningServer:
    return start_tiny_server()


@pytest.fixture(scope="session")
def template_server(tmp_path_factory) -> RunningServer:
    """The tiny model with a BOS-adding tokenizer and a template that shows tools, documents and thinking."""
    server = RunningServer(build_server, [make_template_model(tmp_path_factory.mktemp("template") / "llama"),
                                          *TINY_FLAGS])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir) -> LLM:
    """The offline API on the same tiny model: the reference outputs."""
    return LLM(tiny_model_dir, max_model_len=1024, num_gpu_blocks=256, seed=0)


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


# SmolLM2 cases: (kind, prompt or messages, max_tokens). The references come from the offline API.
SMOLLM2_CASES = {
    "completion": ("completion", "The capital of France is", 12),
    "chat": ("chat", [{"role": "user", "content": "What is the capital of France?"}], 16),
}


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(server, reference texts): SmolLM2 loaded once; the offline `LLM` answers every case first, then
    its engine core is handed to the server (only the engine thread touches it from then on)."""
    llm = LLM(max_model_len=1024, num_gpu_blocks=128, seed=0)
    references = {}
    for name, (kind, prompt, max_tokens) in SMOLLM2_CASES.items():
        run = llm.generate if kind == "completion" else llm.chat
        references[name] = run(prompt, greedy(max_tokens), use_tqdm=False)[0].outputs[0].text
    server = RunningServer(lambda config: serve_core(llm.engine.core, llm.tokenizer, config), ["--max-model-len", "1024"])
    yield server, references
    server.stop()
