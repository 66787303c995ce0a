"""SIGTERM drains the daemon's streams: a stream that ends within the grace period completes, one
still running after it ends UNAVAILABLE "shutting down", and the daemon logs no traceback for it."""

import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import yaml

from fixtures_services import free_port
from kvstore.checksum import SealedBlock
from kvstore.client import KVStoreClient
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.streaming import framed_block
from service_daemon import NS, key, payload

MIB = 1 << 20
GRACE_S = 1.5


def _kvstore_command() -> list[str]:
    script = shutil.which("kvstore")
    return [script] if script else [sys.executable, "-m", "kvstore.cli"]


def _paced_put(i: int, chunks: int, pause_s: float, sent: threading.Event):
    """A Put of one block of `chunks` MiB, one MiB message every `pause_s`."""
    yield pb.PutRequest(header=pb.PutHeader(namespace=NS))
    for message in framed_block(pb.PutRequest, key(i), SealedBlock.seal(payload(i, chunks * MIB), NS, key(i)), MIB):
        yield message
        sent.set()
        time.sleep(pause_s)


def test_sigterm_gives_streams_the_grace_then_ends_them_unavailable(tmp_path):
    port = free_port()
    config = tmp_path / "kvstore.yaml"
    config.write_text(yaml.safe_dump({"tiers": [{"type": "memory", "bytes": "256MiB"}]}))
    process = subprocess.Popen(
        _kvstore_command() + ["serve", "--config", str(config), "--port", str(port), "--grace", str(GRACE_S)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == f"kvstore serving on 127.0.0.1:{port}"
        with KVStoreClient(f"grpc://127.0.0.1:{port}") as client:
            assert client.put(NS, [(key(100 + j), payload(100 + j, MIB)) for j in range(40)]) == 40
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.KVStoreStub(channel)
        outcomes, sent = {}, {1: threading.Event(), 2: threading.Event(), 3: threading.Event()}

        def put(i: int, chunks: int) -> None:
            try:
                outcomes[i] = ("OK", stub.Put(_paced_put(i, chunks, 0.1, sent[i]), timeout=30).stored)
            except grpc.RpcError as error:
                outcomes[i] = (error.code().name, error.details())

        def slow_get() -> None:
            try:
                for _ in stub.Get(pb.GetRequest(namespace=NS, keys=[key(100 + j) for j in range(40)]), timeout=30):
                    sent[3].set()
                    time.sleep(0.1)
                outcomes[3] = ("OK",)
            except grpc.RpcError as error:
                outcomes[3] = (error.code().name, error.details())

        # Stream 1 ends 0.5 s after the signal (within the grace); streams 2 and 3 would take 4-6 s.
        threads = [threading.Thread(target=put, args=(1, 5)), threading.Thread(target=put, args=(2, 60)),
                   threading.Thread(target=slow_get)]
        for thread in threads:
            thread.start()
        for event in sent.values():
            assert event.wait(10)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=20)
        ended = time.monotonic() - signalled
        channel.close()
        assert process.wait(timeout=20) == 0
        stderr = process.stderr.read()

        assert outcomes[1] == ("OK", 1)
        assert outcomes[2] == outcomes[3] == ("UNAVAILABLE", "shutting down")
        assert GRACE_S - 0.2 < ended < GRACE_S + 2
        assert "Traceback" not in stderr, stderr
        assert f"kvstore daemon on port {port} stopped" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
