"""`tierkv serve` refuses what it can check before any weights load: a port in use, a bad
`--kv-transfer-config`. Exit status 2, a message naming the problem, and no model loaded."""

import socket
import subprocess

from tests.server.conftest import TINY_FLAGS
from tests.server.test_serve_process import tierkv_command


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*tierkv_command(), "serve", *args], capture_output=True, text=True, timeout=120)


def test_a_port_in_use_is_refused_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = serve(*TINY_FLAGS, "--host", "127.0.0.1", "--port", str(port))
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "--port" in proc.stderr
    assert "KV cache" not in proc.stderr   # the engine never started


def test_a_bad_kv_transfer_config_is_refused_before_the_model_loads():
    bad = '{"kv_connector": "OffloadingConnector", "kv_connector_extra_config": {"block_sise": 256}}'
    proc = serve(*TINY_FLAGS, "--kv-transfer-config", bad)
    assert proc.returncode == 2
    assert "kv_transfer_config.kv_connector_extra_config.block_sise: unknown key" in proc.stderr
    assert "KV cache" not in proc.stderr
