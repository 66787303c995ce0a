"""The daemon under soak: `kvstore serve` started as its own process, and its metrics read back.

`SpawnedDaemon` writes a config (one memory tier, the soak's limits, a metrics port and a health
port), starts `python -m kvstore.cli serve --port 0`, and learns its gRPC port from the line it
prints and its metrics and health ports from its log (a file beside the config, kept for the
report). `EvictionCounter` polls the memory tier's `kvstore_tier_evictions_total`, so a good client
can tell a lost block from an evicted one.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

_METRICS_LINE = re.compile(r"metrics on http://[^:]+:(\d+)/metrics")
_HEALTH_LINE = re.compile(r"health checks on \S+:(\d+)$", re.MULTILINE)
# Log lines that mean the daemon hit something it did not handle.
_PROBLEM = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b")
EVICTION_POLL_S = 0.25


def scrape(metrics_url: str) -> dict[tuple[str, str | None], float]:
    """(sample name, its tier label or None) -> value, from a Prometheus /metrics page."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    return {(s.name, s.labels.get("tier")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class SpawnedDaemon:
    """`kvstore serve` in its own process, on loopback, with `config` (its tiers and limits; a
    metrics port and a health port are added); a context manager. The soak and `tierkv bench offload --start-kvstore`
    start their daemons with it."""

    def __init__(self, workdir: Path, config: dict):
        self.workdir = workdir
        self.config = {**config, "listen": "127.0.0.1:0", "metrics_port": 0, "health_port": 0}
        self.log_path = workdir / "daemon.log"
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.metrics_url = ""
        self.health_url = ""
        self.exit_code: int | None = None

    def __enter__(self) -> "SpawnedDaemon":
        config_path = self.workdir / "kvstore.json"
        config_path.write_text(json.dumps(self.config))
        with self.log_path.open("w") as log_file:   # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kvstore.cli", "--log-level", "INFO", "serve", "--port", "0",
                 "--config", str(config_path), "--grace", "1"],
                stdout=subprocess.PIPE, stderr=log_file, text=True)
        line = self.process.stdout.readline()
        if "serving on" not in line:
            self.__exit__()
            raise RuntimeError(f"kvstore serve did not start: {line.strip()} {self.log_path.read_text()[-2000:]}")
        self.url = f"grpc://127.0.0.1:{line.rsplit(':', 1)[1].strip()}"
        self.metrics_url = f"http://127.0.0.1:{self._logged_port(_METRICS_LINE, 'metrics')}/metrics"
        self.health_url = f"grpc://127.0.0.1:{self._logged_port(_HEALTH_LINE, 'health')}"
        log.info("daemon pid %d on %s, health checks on %s, metrics %s, log %s", self.pid, self.url,
                 self.health_url, self.metrics_url, self.log_path)
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def _logged_port(self, line: re.Pattern, what: str) -> int:
        # Logged before the "serving on" line is printed, so it is in the file already.
        match = line.search(self.log_path.read_text())
        if match is None:
            raise RuntimeError(f"kvstore serve did not log its {what} port; see {self.log_path}")
        return int(match.group(1))

    def problems(self) -> list[str]:
        """The daemon log's lines that report an error or a traceback."""
        return [line for line in self.log_path.read_text().splitlines() if _PROBLEM.search(line)]

    def __exit__(self, *exc: object) -> None:
        if self.process is None or self.exit_code is not None:
            return
        self.process.terminate()
        try:
            self.exit_code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.exit_code = self.process.wait()
        self.process.stdout.close()


class EvictionCounter:
    """The memory tiers' evictions (`kvstore_tier_evictions_total`, summed), polled every
    EVICTION_POLL_S by a thread; `polled` is the last value, `now()` scrapes afresh. None when the
    daemon's metrics cannot be read (or no URL was given): misses are then all counted as losses."""

    def __init__(self, metrics_url: str | None):
        self.metrics_url = metrics_url
        self.polled: float | None = self.now()
        self.start = self.polled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="soak-evictions", daemon=True)

    def now(self) -> float | None:
        if not self.metrics_url:
            return None
        try:
            samples = scrape(self.metrics_url)
        except OSError as error:
            log.warning("cannot read the daemon's metrics (%s): evictions unknown", error)
            return None
        return sum(value for (name, _), value in samples.items() if name == "kvstore_tier_evictions_total")

    def __enter__(self) -> "EvictionCounter":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(EVICTION_POLL_S):
            self.polled = self.now()


def wait_inflight_released(metrics_url: str, timeout_s: float = 5.0) -> float | None:
    """`kvstore_inflight_put_bytes` once it is back to 0 (or whatever it is after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            held = scrape(metrics_url).get(("kvstore_inflight_put_bytes", None))
        except OSError:
            return None
        if not held or time.monotonic() > deadline:
            return held
        time.sleep(0.1)
