"""Real backing services for tests: a redis-server process and a moto S3 server, on free ports.

Importable by any test (kvstore, connector, engine): `start_redis()` and `start_moto()` return the
address and the functions that stop (and restart) the service, so a test can take a tier down
and bring it back on the same address. `start_redis_cluster()` starts a Redis Cluster of several
masters from the same binary.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable

import boto3
import redis

MOTO_ACCESS_KEY = "testing-access-key"
MOTO_SECRET_KEY = "testing-secret-key"
MOTO_REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (held open together while chosen, so none is picked twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _wait_until(ready: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not come up within {timeout_s} s")


def start_redis(maxmemory: str | None = None, maxmemory_policy: str = "allkeys-lru", unix_socket: bool = False):
    """Start a private redis-server; returns (url, stop_fn, restart_fn).

    No persistence: a restart comes back empty, like a Redis that lost its data. With
    `unix_socket`, the URL is `unix:///...` (the server still listens on a free TCP port too).
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="tierkv-redis-")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", workdir, "--loglevel", "warning"]
    if maxmemory:
        args += ["--maxmemory", maxmemory, "--maxmemory-policy", maxmemory_policy]
    url = f"redis://127.0.0.1:{port}/0"
    if unix_socket:
        args += ["--unixsocket", f"{workdir}/redis.sock", "--unixsocketperm", "700"]
        url = f"unix://{workdir}/redis.sock?db=0"
    process: list[subprocess.Popen] = []

    def ping() -> bool:
        try:
            return redis.Redis.from_url(url, socket_timeout=0.2, socket_connect_timeout=0.2).ping()
        except redis.RedisError:
            return False

    def start() -> None:
        process.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_until(ping, f"redis-server on port {port}")

    def stop() -> None:
        while process:
            proc = process.pop()
            proc.terminate()
            proc.wait(timeout=10)

    def restart() -> None:
        stop()
        start()

    start()
    return url, stop, restart


def redis_cluster_binaries() -> tuple[str, str] | None:
    """(redis-server, redis-cli) paths, or None if either is missing."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    return (server, cli) if server and cli else None


def start_redis_cluster(masters: int = 3):
    """Start a Redis Cluster of `masters` primaries and no replicas on loopback; returns
    (url of one node, [node addresses], stop_fn, restart_fn). Each node listens on a free port and
    talks to the others on a second free port (`cluster-port`: the default, port + 10000, may be taken
    or past 65535). No persistence: a restart brings the same nodes back (their nodes.conf keeps the
    slot map) with no keys.
    """
    binaries = redis_cluster_binaries()
    if binaries is None:
        raise RuntimeError("redis-server and redis-cli are needed for a Redis Cluster (apt-get install redis-server)")
    server, cli = binaries
    ports = free_ports(2 * masters)
    workdir = tempfile.mkdtemp(prefix="tierkv-redis-cluster-")
    processes: list[subprocess.Popen] = []
    nodes = [f"127.0.0.1:{port}" for port in ports[:masters]]

    def stop() -> None:
        while processes:
            proc = processes.pop()
            proc.terminate()
            proc.wait(timeout=10)

    def cluster_ok(port: int) -> bool:
        try:
            info = redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.2).cluster("info")
        except redis.RedisError:
            return False
        return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == masters

    def start_nodes() -> None:
        for port, bus_port in zip(ports[:masters], ports[masters:]):
            processes.append(subprocess.Popen(
                [server, "--port", str(port), "--cluster-port", str(bus_port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-config-file", f"{workdir}/nodes-{port}.conf",
                 "--save", "", "--appendonly", "no", "--dir", workdir, "--loglevel", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in ports[:masters]:
            _wait_until(lambda port=port: _redis_up(port), f"redis-server (cluster node) on port {port}")

    def wait_ok() -> None:
        for port in ports[:masters]:
            _wait_until(lambda port=port: cluster_ok(port), f"Redis Cluster state ok on port {port}", timeout_s=30)

    def restart() -> None:
        stop()
        start_nodes()
        wait_ok()

    try:
        start_nodes()
        subprocess.run([cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, timeout=60, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_ok()
    except BaseException:
        stop()
        raise
    return f"redis://{nodes[0]}", nodes, stop, restart


def _redis_up(port: int) -> bool:
    try:
        return redis.Redis(port=port, socket_timeout=0.2, socket_connect_timeout=0.2).ping()
    except redis.RedisError:
        return False


def start_moto(port: int | None = None):
    """Start moto's S3 server over HTTP; returns ("127.0.0.1:port", stop_fn).

    moto keeps its state per process, not per server: a new server on the same port sees the
    buckets of the old one.
    """
    from moto.server import ThreadedMotoServer

    port = port or free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"127.0.0.1:{port}"
    _wait_until(lambda: _http_up(port), f"moto server on port {port}")
    return endpoint, server.stop


def _http_up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def s3_client(endpoint: str):
    """A boto3 client for the moto server (tests use it to bypass the store)."""
    return boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name=MOTO_REGION,
                        aws_access_key_id=MOTO_ACCESS_KEY, aws_secret_access_key=MOTO_SECRET_KEY)


def make_bucket(endpoint: str, bucket: str) -> None:
    s3_client(endpoint).create_bucket(Bucket=bucket)


def obj_tier(endpoint: str, bucket: str, **extra) -> dict:
    """The tier dict of an `obj` tier on the moto server."""
    return {"type": "obj", "bucket": bucket, "endpoint_override": endpoint, "scheme": "http",
            "access_key": MOTO_ACCESS_KEY, "secret_key": MOTO_SECRET_KEY, "region": MOTO_REGION, **extra}
