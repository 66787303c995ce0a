"""The stores a benchmark runs against, given by URL or started here for the run: a private
redis-server, moto's S3 server, a `kvstore serve` daemon whose memory tier is a slab."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, what: str, timeout_s: float = 10.0) -> None:
    """Return once something accepts connections on `port`; exit naming `what` if it never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"tierkv bench: {what} did not come up on port {port} within {timeout_s} s")


def start_redis(stack: ExitStack) -> str:
    """A private redis-server (no persistence) for the run; its URL. Stopped when `stack` closes."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("tierkv bench: --start-redis needs the redis-server binary on PATH")
    port = free_port()
    workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tierkv-bench-redis-"))
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(proc.wait, 10)
    stack.callback(proc.terminate)
    wait_for_port(port, "redis-server")
    return f"redis://127.0.0.1:{port}/0"


def start_moto(stack: ExitStack) -> str:
    """moto's S3 server as a separate process for the run; its host:port. Not in this process: it
    serves each request in Python, and its threads would take the interpreter from the engine's
    (decode ITL 8.9x with saves going to S3 on an H100), which a real S3 endpoint never does."""
    try:
        import moto.server  # noqa: F401 - only to say what is missing before starting it
    except ImportError:
        raise SystemExit("tierkv bench: --start-moto needs moto[server] (pip install 'moto[server]')") from None
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(_stop, proc)
    wait_for_port(port, "moto server", timeout_s=30.0)
    return f"127.0.0.1:{port}"


def ensure_bucket(endpoint: str, bucket: str, access_key: str, secret_key: str) -> None:
    """Create `bucket` on the S3 endpoint unless it exists."""
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1",
                      aws_access_key_id=access_key, aws_secret_access_key=secret_key)
    try:
        s3.create_bucket(Bucket=bucket)
    except ClientError as e:
        if e.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def start_kvstore(stack: ExitStack, slab_bytes: int, slot_bytes: int) -> str:
    """`kvstore serve` as a separate process on this host, its memory tier a slab of `slab_bytes`
    in slots of `slot_bytes` (the engine's offloaded block size, so the engine maps it); its URL.
    Stopped with SIGTERM when `stack` closes, which removes the slab's /dev/shm segment."""
    from kvstore.soak_daemon import SpawnedDaemon

    workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tierkv-bench-kvstore-"))
    tier = {"type": "memory", "bytes": slab_bytes, "slot_bytes": slot_bytes}
    try:
        daemon = stack.enter_context(SpawnedDaemon(Path(workdir), {"tiers": [tier]}))
    except RuntimeError as error:
        raise SystemExit(f"tierkv bench: {error}") from None
    logger.info("started kvstore serve at %s: a %d-slot slab of %d-byte slots", daemon.url, slab_bytes // slot_bytes,
                slot_bytes)
    return daemon.url


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
