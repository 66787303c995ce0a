"""The ceiling for the daemon: raw gRPC streaming of the same bytes on loopback, with no store.

`kvstore bench --baseline` runs this beside the real measurements, so the daemon's numbers come with
a ratio to what Python gRPC itself moves on the same machine at the same moment (these machines are
noisy; ratios from one run are what we compare). Put = a client stream of 1 MiB raw byte messages
into a sink; Get = a server stream of them out of a source: the daemon's framing without protobuf,
checksums or tiers.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc

from kvstore.streaming import CHUNK_BYTES

_SERVICE = "tierkv.bench.RawBytes"
_MAX_MESSAGE = 64 << 20


def _identity(data: bytes) -> bytes:
    return data


def _sink(request_iterator, _context) -> bytes:
    received = sum(len(chunk) for chunk in request_iterator)
    return received.to_bytes(8, "big")


def _source(request: bytes, _context):
    total = int.from_bytes(request, "big")
    chunk = bytes(CHUNK_BYTES)
    for offset in range(0, total, CHUNK_BYTES):
        yield chunk[: min(CHUNK_BYTES, total - offset)]


class RawGrpcLoopback:
    """A loopback gRPC server with a byte sink and source, and a channel to it."""

    def __init__(self):
        handlers = grpc.method_handlers_generic_handler(_SERVICE, {
            "Sink": grpc.stream_unary_rpc_method_handler(_sink, _identity, _identity),
            "Source": grpc.unary_stream_rpc_method_handler(_source, _identity, _identity),
        })
        options = [("grpc.max_receive_message_length", _MAX_MESSAGE), ("grpc.max_send_message_length", _MAX_MESSAGE)]
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4), handlers=[handlers], options=options)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        self._sink = self._channel.stream_unary(f"/{_SERVICE}/Sink", _identity, _identity)
        self._source = self._channel.unary_stream(f"/{_SERVICE}/Source", _identity, _identity)

    def put(self, payloads: list[bytes]) -> int:
        """Stream the payloads in CHUNK_BYTES pieces; bytes the sink received."""
        def chunks():
            for payload in payloads:
                view = memoryview(payload)
                for offset in range(0, len(view), CHUNK_BYTES):
                    yield bytes(view[offset : offset + CHUNK_BYTES])

        return int.from_bytes(self._sink(chunks(), timeout=600), "big")

    def get(self, total_bytes: int) -> int:
        """Stream `total_bytes` back in CHUNK_BYTES pieces; bytes received."""
        return sum(len(chunk) for chunk in self._source(total_bytes.to_bytes(8, "big"), timeout=600))

    def close(self) -> None:
        self._channel.close()
        self._server.stop(0).wait()

    def __enter__(self) -> "RawGrpcLoopback":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
