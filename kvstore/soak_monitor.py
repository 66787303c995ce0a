"""The soak's watcher: `grpc.health.v1.Health/Check` on the daemon, one after another with an interval
between them, each timed, and the daemon process's RSS sampled beside each.

It runs as its own process (`HealthMonitor`): in the soak's process its clock would also count the
time its thread waits for the GIL behind dozens of client threads, so a slow check would say as much
about the soak as about the daemon.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# How many failure messages the summary keeps (the count is always whole).
_KEPT_FAILURES = 5


@dataclass
class MonitorSummary:
    """Health checks and RSS samples over the run; RSS fields are None without a daemon pid."""

    checks: int = 0
    failures: int = 0
    slow: int = 0
    max_ms: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    rss_start_bytes: int | None = None
    rss_max_bytes: int | None = None
    rss_end_bytes: int | None = None
    failure_messages: list[str] = field(default_factory=list)


def rss_bytes(pid: int) -> int | None:
    """Resident set size of process `pid` (Linux /proc), or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _percentile(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return 0.0
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


def _watch(address: str, pid: int | None, interval_s: float, deadline_s: float, slow_ms: float,
           ready, stop, live, results) -> None:
    """The monitor process: check and sample until `stop` is set, then put a MonitorSummary dict."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    summary = MonitorSummary()
    latencies: list[float] = []
    request = health_pb2.HealthCheckRequest(service="")
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(request, timeout=10)   # connect before the clock starts
        summary.rss_start_bytes = rss_bytes(pid) if pid else None
        ready.set()
        while not stop.wait(interval_s):
            started = time.perf_counter()
            try:
                status = stub.Check(request, timeout=deadline_s).status
                failure = None if status == health_pb2.HealthCheckResponse.SERVING else f"status {status}"
            except grpc.RpcError as error:
                failure = f"{error.code().name}: {error.details()}"
            elapsed_ms = (time.perf_counter() - started) * 1000
            summary.checks += 1
            latencies.append(elapsed_ms)
            summary.slow += elapsed_ms > slow_ms
            if failure is not None:
                summary.failures += 1
                if len(summary.failure_messages) < _KEPT_FAILURES:
                    summary.failure_messages.append(failure)
            rss = rss_bytes(pid) if pid else None
            if rss is not None:
                summary.rss_max_bytes = max(summary.rss_max_bytes or 0, rss)
                summary.rss_end_bytes = rss
            live[0], live[1], live[2] = summary.checks, max(live[1], elapsed_ms), float(rss or 0)
    latencies.sort()
    summary.max_ms = latencies[-1] if latencies else 0.0
    summary.p50_ms = _percentile(latencies, 0.50)
    summary.p99_ms = _percentile(latencies, 0.99)
    results.put(asdict(summary))


class HealthMonitor:
    """Starts the watcher process; `live` shows (checks, max ms, last RSS) while it runs."""

    def __init__(self, address: str, pid: int | None, interval_s: float, deadline_s: float, slow_ms: float):
        context = multiprocessing.get_context("spawn")   # no copy of this process's threads and channels
        self._ready = context.Event()
        self._stop = context.Event()
        self._results = context.Queue()
        self.live = context.Array("d", 3, lock=False)
        self._process = context.Process(
            target=_watch, name="kvstore-soak-monitor", daemon=True,
            args=(address, pid, interval_s, deadline_s, slow_ms, self._ready, self._stop, self.live, self._results))

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the watcher; returns once its first check answered (RuntimeError if none did)."""
        self._process.start()
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.1):
            if not self._process.is_alive() or time.monotonic() > deadline:
                self._process.kill()
                raise RuntimeError(f"the health monitor got no answer from the daemon within {timeout_s:g} s")

    def stop(self, timeout_s: float = 30.0) -> MonitorSummary:
        """Stop the watcher and return its summary."""
        self._stop.set()
        summary = MonitorSummary(**self._results.get(timeout=timeout_s))
        self._process.join(timeout_s)
        return summary

    def close(self) -> None:
        """End the watcher whatever state it is in (after `stop`, or when the run failed)."""
        self._stop.set()
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
