"""`tierkv serve` exits non-zero once its engine dies, so that a supervisor restarts it.

The engine is made to die the way a broken device would kill it: every step raises. The process is
the real CLI entry point (`engine.cli.main`), started through `python -c` only to patch the step.
"""

import subprocess
import sys
import time

import httpx
import pytest

from engine.server.async_engine import MAX_CONSECUTIVE_STEP_FAILURES
from tests.server.conftest import TINY_FLAGS, free_port

BROKEN_SERVE = """
import sys
from engine.cli import main
from engine.core.engine_core import EngineCore

def step(self):
    raise RuntimeError("injected step failure")

EngineCore.step = step
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_serve_exits_1_after_its_engine_dies(tiny_model_dir):
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", BROKEN_SERVE, "serve", tiny_model_dir, *TINY_FLAGS,
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "tierkv serve did not answer /health in time"
            try:
                if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
        with httpx.Client(base_url=base_url, timeout=60) as client:
            statuses = [client.post("/v1/chat/completions", json=body).status_code
                        for _ in range(MAX_CONSECUTIVE_STEP_FAILURES)]
        assert statuses == [500] * (MAX_CONSECUTIVE_STEP_FAILURES - 1) + [503]
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 1, output
        assert "the engine died" in output and "shutting down so that a supervisor restarts the server" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
