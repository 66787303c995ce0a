"""The daemon's health checks on a gRPC server of their own (`health_port`), so that a probe never
waits behind data calls.

Under `kvstore soak` (64 clients, 2 cores) a Health/Check on the data port spent under 0.1 ms in its
handler and p50 41 ms, p99 213 ms before it: every event of every call on one gRPC server (a new
call, each message of a stream) is handled in turn by the one Python thread that polls that
server's completion queue, so a check waits behind the data streams' messages. A second server has
its own completion queue, polling thread and threads, and no interceptors; checked side by side,
its p50 was 14 ms against 50 ms, its p99 90 ms against 190 ms (docs/reliability.md, daemon soak).
What is left is this process's GIL and its share of the CPU, which every thread of the daemon needs.

The health port serves `Check` only: a `Watch` stream would hold one of its few threads for as long
as the client keeps it open, so a handful of them could keep the probes out (UNIMPLEMENTED there;
the data port serves both, at most `HEALTH_THREADS // 2` Watch streams at once, so its Checks
always have threads). Statuses come from the daemon's one `HealthServicer`, so both ports always
answer the same.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
# A Check takes microseconds: a few threads answer many probes; more calls at once are refused
# (RESOURCE_EXHAUSTED) rather than queued.
THREADS = 4
# A HealthCheckRequest is a service name: requests are refused far below the data port's limits.
MAX_REQUEST_BYTES = 4096


class HealthServicer(health.HealthServicer):
    """grpc's health servicer with at most `max_watches` Watch streams at once (RESOURCE_EXHAUSTED
    beyond): gRPC Python's sync server holds a thread for each open Watch, and the data port's
    threads beyond its KVStore calls are what its Checks are answered on."""

    def __init__(self, max_watches: int) -> None:
        super().__init__(experimental_non_blocking=True)
        self.max_watches = max_watches
        self._watch_slots = threading.BoundedSemaphore(max_watches)

    def Watch(self, request, context, send_response_callback=None):
        if not self._watch_slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"at most {self.max_watches} health Watch streams at once; poll with Check")
        if not context.add_callback(self._watch_slots.release):
            self._watch_slots.release()   # the call had already ended
        return super().Watch(request, context, send_response_callback)


def start_health_server(servicer: health.HealthServicer, address: str,
                        credentials: grpc.ServerCredentials | None) -> tuple[grpc.Server, int]:
    """Start a server answering `servicer.Check` on `address` (TLS when `credentials`); returns it
    and its bound port. OSError when it cannot listen there."""
    server = grpc.server(ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="kvstore-health"),
                         maximum_concurrent_rpcs=THREADS,
                         options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                                  ("grpc.so_reuseport", 0)])
    check = grpc.unary_unary_rpc_method_handler(
        servicer.Check, request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(HEALTH_SERVICE, {"Check": check})])
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"kvstore: cannot listen for health checks on {address} (port in use or bad host)")
    server.start()
    log.info("health checks on %s", address.rsplit(":", 1)[0] + f":{port}")
    return server, port
