"""Daemon metrics: per-RPC latency, status and payload bytes, and the Prometheus HTTP endpoint.

Per-tier traffic and up/down (`kvstore_tier_*`) is counted by the store (kvstore/tier_metrics.py);
this module covers what only the daemon sees. All metrics live in prometheus_client's
default registry, so one `/metrics` port shows both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from kvstore.rpc_handlers import behavior_of, rewrapped

log = logging.getLogger(__name__)

# Blocks are MiBs: a Get of 8 MiB over loopback takes milliseconds, a cold S3 read up to seconds.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

RPC_LATENCY = Histogram("kvstore_rpc_duration_seconds", "Latency of kvstore RPCs, by method",
                        ["method"], buckets=_LATENCY_BUCKETS)
RPC_TOTAL = Counter("kvstore_rpcs", "kvstore RPCs by method and final status code", ["method", "code"])
RPC_BYTES = Counter("kvstore_rpc_payload_bytes", "Block payload bytes carried by RPCs", ["method"])
INFLIGHT_PUT_BYTES = Gauge("kvstore_inflight_put_bytes",
                           "Block bytes of Put streams admitted and held by the daemon, not yet in the store "
                           "(at most max_inflight_put_bytes)")


def start_metrics_server(port: int, host: str = "0.0.0.0"):
    """Serve /metrics on `port`; returns the HTTP server (call `.shutdown()` to stop it)."""
    server, _thread = start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server


def _code_name(context: grpc.ServicerContext, failed: bool) -> str:
    code = context.code()
    if code is not None:
        return code.name
    if not failed:
        return "OK"
    # A stream closed without a status set: the client went away mid-call.
    return "UNKNOWN" if context.is_active() else "CANCELLED"


class RpcMetricsInterceptor(grpc.ServerInterceptor):
    """Times every RPC (streaming ones until their last message) and counts its final status."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        timed = _timed_stream if handler.response_streaming else _timed_unary
        return rewrapped(handler, timed(behavior_of(handler), method))


def _observe(method: str, start: float, context: grpc.ServicerContext, failed: bool) -> None:
    RPC_LATENCY.labels(method=method).observe(time.perf_counter() - start)
    RPC_TOTAL.labels(method=method, code=_code_name(context, failed)).inc()


def _timed_unary(behavior: Callable, method: str) -> Callable:
    def timed(request, context):
        start, failed = time.perf_counter(), True
        try:
            response = behavior(request, context)
            failed = False
            return response
        finally:
            _observe(method, start, context, failed)

    return timed


def _timed_stream(behavior: Callable, method: str) -> Callable:
    def timed(request, context) -> Iterator:
        start, failed = time.perf_counter(), True
        try:
            yield from behavior(request, context)
            failed = False
        finally:
            _observe(method, start, context, failed)

    return timed
