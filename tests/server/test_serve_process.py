"""`tierkv serve` as a real process: answers, drains in-flight requests on SIGTERM, exits 0."""

import json
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.server.conftest import TINY_FLAGS, free_port


def tierkv_command() -> list[str]:
    script = shutil.which("tierkv")
    return [script] if script else [sys.executable, "-m", "engine.cli"]


class ServeProcess:
    def __init__(self, *args: str, startup_timeout: float = 60) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([*tierkv_command(), "serve", *args, "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + startup_timeout
        while True:
            assert self.proc.poll() is None, f"tierkv serve exited early:\n{self.proc.stdout.read()}"
            assert time.monotonic() < deadline, "tierkv serve did not answer /health in time"
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)

    def terminate(self, timeout: float = 60) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        output, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, output

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.slow
def test_sigterm_lets_in_flight_streams_finish_then_exits_0(tiny_model_dir):
    server = ServeProcess(tiny_model_dir, *TINY_FLAGS, "--host", "127.0.0.1", "--shutdown-timeout", "60")
    try:
        body = {"prompt": "a", "max_tokens": 200, "ignore_eos": True, "temperature": 0, "stream": True}
        with httpx.Client(base_url=server.base_url, timeout=60) as client, \
                client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
        server.proc.wait(timeout=60)
        assert server.proc.returncode == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.base_url}/health", timeout=2)
    finally:
        server.kill()


@pytest.mark.slow
def test_sigterm_aborts_what_outlasts_the_grace_period(tiny_model_dir):
    server = ServeProcess(tiny_model_dir, *TINY_FLAGS, "--host", "127.0.0.1", "--shutdown-timeout", "0.5")
    try:
        body = {"prompt": "a", "max_tokens": 1000, "ignore_eos": True, "temperature": 0, "stream": True}
        with httpx.Client(base_url=server.base_url, timeout=60) as client, \
                client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            with pytest.raises(httpx.RemoteProtocolError):
                for _ in lines:
                    pass
        assert time.monotonic() - started < 30
        code, output = server.terminate()
        assert code == 0, output
        assert "timeout graceful shutdown exceeded" in output
    finally:
        server.kill()


@pytest.mark.slow
def test_tierkv_serve_without_a_model_answers_a_chat_request():
    server = ServeProcess(startup_timeout=600)
    try:
        with httpx.Client(base_url=server.base_url, timeout=300) as client:
            response = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 16, "temperature": 0})
        assert response.status_code == 200, response.text
        assert "Paris" in response.json()["choices"][0]["message"]["content"]
        code, output = server.terminate()
        assert code == 0, output
    finally:
        server.kill()
