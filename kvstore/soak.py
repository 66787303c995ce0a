"""`kvstore soak`: many clients, good and abusive, against one daemon for a while; proves it stays up.

The daemon is started as its own process (`kvstore serve`, one memory tier of `memory_bytes`,
kvstore/soak_daemon.py) unless a URL is given. `clients` threads (kvstore/soak_clients.py) run for
`duration_s`: good ones put, read back, compare and delete blocks; stalled ones open streams and go
quiet; oversized ones send what is over the limits; disconnecting ones walk away mid-stream. A
separate process (kvstore/soak_monitor.py) checks the daemon's health on its health port (the one
Kubernetes probes; with a URL, `health_url`, by default the URL itself) with `health_interval_s`
between checks and samples its RSS. `clients_nice` runs the clients below the daemon and the
monitor, for a machine where they share its cores.

The report says what was done and what went wrong; `failures()` lists what fails the run (exit 1):
a wrong byte, an acknowledged block lost (missing while the memory tier evicted nothing since its
Put was acknowledged), a health check that failed or took over `health_slow_ms`, a gRPC status no
client of that kind should get (INTERNAL, UNKNOWN, ...), and, with `rss_allowance_bytes`, a daemon
RSS over 1.5 x `memory_bytes` + that allowance.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from kvstore.client import Target
from kvstore.soak_clients import CLIENTS, KINDS, ClientSetup, Tally
from kvstore.soak_daemon import EvictionCounter, SpawnedDaemon, wait_inflight_released
from kvstore.soak_monitor import HealthMonitor, MonitorSummary

log = logging.getLogger(__name__)

# The statuses each kind of client may get from a healthy daemon. Good clients are turned away as
# busy (RESOURCE_EXHAUSTED, retried) while abusive ones hold calls; stalled streams are cut
# (CANCELLED, or DEADLINE_EXCEEDED). OK is every abusive client's own block (its Put and Delete).
EXPECTED_STATUSES = {
    "good": {"OK", "RESOURCE_EXHAUSTED"},
    "stalled": {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"},
    "oversized": {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"},
    "disconnecting": {"OK", "CANCELLED", "RESOURCE_EXHAUSTED"},
}
# What an oversized request itself must get (OK is its client's own setup block).
OVERSIZED_REFUSALS = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
RSS_BUDGET_FACTOR = 1.5
# The daemon's idle watchdog looks every second at most: a stalled Get is cut within this much
# past stream_idle_timeout_s.
STALL_GRACE_S = 2.0


@dataclass(frozen=True)
class SoakConfig:
    """The options of one soak run; `validate()` names the option at fault."""

    url: str | None = None
    clients: int = 64
    duration_s: float = 300.0
    block_bytes: int = 1 << 20
    batch: int = 2
    window: int = 4
    memory_bytes: int = 256 << 20
    max_message_bytes: int = 8 << 20
    stream_idle_timeout_s: float = 30.0
    stalled_fraction: float = 0.10
    oversized_fraction: float = 0.10
    disconnecting_fraction: float = 0.05
    health_interval_s: float = 0.1
    health_deadline_s: float = 1.0
    health_slow_ms: float = 100.0
    metrics_url: str | None = None
    health_url: str | None = None
    daemon_pid: int | None = None
    clients_nice: int = 0
    rss_allowance_bytes: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first option that is out of range."""
        checks = [
            (self.clients >= 1, "--clients: expected at least 1"),
            (self.duration_s > 0, "--duration-s: expected a positive number of seconds"),
            (self.block_bytes >= 1, "--block-bytes: expected at least 1 byte"),
            (self.batch >= 1, "--batch: expected at least 1 block"),
            (self.window >= self.batch, "--window: expected at least --batch blocks"),
            (self.max_message_bytes >= max(1024, self.block_bytes),
             "--max-message-bytes: expected at least --block-bytes (and 1 KiB)"),
            (self.stream_idle_timeout_s > 0, "--stream-idle-timeout-s: expected a positive number of seconds"),
            (0 < self.health_interval_s and 0 < self.health_deadline_s and 0 < self.health_slow_ms,
             "--health-interval-s, --health-deadline-s, --health-slow-ms: expected positive numbers"),
            (0 <= self.clients_nice <= 19, "--clients-nice: expected 0 to 19"),
        ]
        for fraction, option in ((self.stalled_fraction, "--stalled-fraction"),
                                 (self.oversized_fraction, "--oversized-fraction"),
                                 (self.disconnecting_fraction, "--disconnecting-fraction")):
            checks.append((0 <= fraction <= 1, f"{option}: expected a fraction between 0 and 1"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for url in (self.url, self.health_url):
            if url:
                Target.parse(url)
        plan = self.plan()
        if plan["good"] < 1:
            raise ValueError(f"--clients: {self.clients} clients leave no good client after the stalled, "
                             f"oversized and disconnecting fractions ({plan})")
        if not self.url and self.kept_bytes(plan) > self.memory_bytes:
            raise ValueError(f"--memory-bytes: {self.memory_bytes} is below the {self.kept_bytes(plan)} bytes the "
                             f"clients keep stored (good clients x --window x --block-bytes, plus one block per "
                             f"abusive client): acknowledged blocks would be evicted")

    def plan(self) -> dict[str, int]:
        """Clients of each kind: each abusive kind with a fraction above 0 gets at least one, good the rest."""
        fractions = {"stalled": self.stalled_fraction, "oversized": self.oversized_fraction,
                     "disconnecting": self.disconnecting_fraction}
        plan = {kind: max(1, round(f * self.clients)) if f > 0 else 0 for kind, f in fractions.items()}
        return {"good": self.clients - sum(plan.values()), **plan}

    def kept_bytes(self, plan: dict[str, int]) -> int:
        """Block bytes the clients keep stored at most."""
        blocks = plan["good"] * self.window + plan["stalled"] + plan["oversized"] + plan["disconnecting"]
        return blocks * self.block_bytes


@dataclass
class SoakReport:
    """What one run did and measured (the JSON report)."""

    duration_s: float
    clients: dict[str, int]
    puts: int
    gets: int
    bytes_put: int
    bytes_got: int
    blocks_verified: int
    wrong_bytes: int
    wrong_blocks: int
    lost_blocks: int
    misses_after_eviction: int
    evictions: float | None
    health: dict
    rss: dict
    statuses: dict[str, dict[str, int]]
    unexpected_statuses: dict[str, dict[str, int]]
    inflight_put_bytes_after: float | None
    clients_nice: int = 0
    daemon_log_problems: list[str] = field(default_factory=list)
    daemon_exit_code: int | None = None
    failures: list[str] = field(default_factory=list)


def _rss_report(summary: MonitorSummary, cfg: SoakConfig) -> dict:
    rss = {"start_bytes": summary.rss_start_bytes, "max_bytes": summary.rss_max_bytes,
           "end_bytes": summary.rss_end_bytes, "budget_bytes": cfg.memory_bytes}
    if summary.rss_max_bytes is not None:
        rss["max_over_budget"] = round(summary.rss_max_bytes / cfg.memory_bytes, 3)
        rss["max_minus_1_5_budget_bytes"] = summary.rss_max_bytes - int(RSS_BUDGET_FACTOR * cfg.memory_bytes)
    return rss


def failures(report: SoakReport, cfg: SoakConfig) -> list[str]:
    """Why the run fails its gate; empty when it passes."""
    found = []
    if report.wrong_bytes:
        found.append(f"{report.wrong_bytes} wrong bytes in {report.wrong_blocks} blocks")
    if report.lost_blocks:
        found.append(f"{report.lost_blocks} acknowledged blocks lost")
    if report.health["failures"]:
        found.append(f"{report.health['failures']} health checks failed")
    if report.health["slow"]:
        found.append(f"{report.health['slow']} health checks took over {cfg.health_slow_ms:g} ms")
    for kind, codes in report.unexpected_statuses.items():
        if codes:
            found.append(f"{kind} clients got unexpected statuses {codes}")
    oversized = report.statuses.get("oversized", {})
    if report.clients.get("oversized") and not OVERSIZED_REFUSALS & set(oversized):
        found.append("no oversized request was refused")
    excess = report.rss.get("max_minus_1_5_budget_bytes")
    if cfg.rss_allowance_bytes is not None and excess is not None and excess > cfg.rss_allowance_bytes:
        found.append(f"daemon RSS exceeded 1.5 x budget by {excess} bytes (allowed {cfg.rss_allowance_bytes})")
    return found


def _run_clients(cfg: SoakConfig, setup: ClientSetup, monitor: HealthMonitor) -> float:
    """Run every client for cfg.duration_s (a progress bar meanwhile); the seconds they ran."""
    # Threads inherit their creator's niceness: the clients' (and their channels' threads), not the
    # daemon's or the monitor's, which were started before. On a machine they share, the clients'
    # CPU is the harness's load, not the daemon's to win.
    if cfg.clients_nice:
        os.nice(cfg.clients_nice)
    threads = []
    index = 0
    for kind, count in cfg.plan().items():
        for _ in range(count):
            client = CLIENTS[kind](setup, index)
            threads.append(threading.Thread(target=_logged(client.run, kind), name=f"soak-{kind}-{index}", daemon=True))
            index += 1
    started = time.monotonic()
    for thread in threads:
        thread.start()
    with tqdm(total=round(cfg.duration_s), unit="s", desc="soak", disable=None) as bar:
        while (elapsed := time.monotonic() - started) < cfg.duration_s:
            time.sleep(min(1.0, cfg.duration_s - elapsed))
            bar.update(round(time.monotonic() - started) - bar.n)
            bar.set_postfix(puts=setup.tally.puts, wrong=setup.tally.wrong_bytes, lost=setup.tally.lost_blocks,
                            health_max_ms=round(monitor.live[1]), rss_mib=round(monitor.live[2] / 2**20))
    setup.stop.set()
    for thread in threads:
        thread.join()
    return time.monotonic() - started


def _logged(run, kind: str):
    def logged() -> None:
        try:
            run()
        except Exception:  # a client that dies is reported, and the others go on
            log.exception("a %s client failed", kind)

    return logged


def _report(cfg: SoakConfig, tally: Tally, ran_s: float, monitor: MonitorSummary,
            evictions: EvictionCounter) -> SoakReport:
    now = evictions.now()
    health = {key: getattr(monitor, key) for key in ("checks", "failures", "slow", "max_ms", "p50_ms", "p99_ms")}
    health.update(slow_ms=cfg.health_slow_ms, interval_s=cfg.health_interval_s,
                  failure_messages=monitor.failure_messages)
    statuses = {kind: dict(tally.statuses[kind]) for kind in KINDS}
    return SoakReport(
        duration_s=round(ran_s, 1), clients=cfg.plan(), puts=tally.puts, gets=tally.gets,
        bytes_put=tally.bytes_put, bytes_got=tally.bytes_got, blocks_verified=tally.blocks_verified,
        wrong_bytes=tally.wrong_bytes, wrong_blocks=tally.wrong_blocks, lost_blocks=tally.lost_blocks,
        misses_after_eviction=tally.misses_after_eviction,
        evictions=None if now is None or evictions.start is None else now - evictions.start,
        health=health, rss=_rss_report(monitor, cfg), statuses=statuses,
        unexpected_statuses={kind: {code: n for code, n in codes.items() if code not in EXPECTED_STATUSES[kind]}
                             for kind, codes in statuses.items()},
        inflight_put_bytes_after=wait_inflight_released(evictions.metrics_url) if evictions.metrics_url else None,
        clients_nice=cfg.clients_nice)


def _soak(cfg: SoakConfig, url: str, health_url: str, metrics_url: str | None, pid: int | None) -> SoakReport:
    monitor = HealthMonitor(Target.parse(health_url).address, pid, cfg.health_interval_s, cfg.health_deadline_s,
                            cfg.health_slow_ms)
    monitor.start()
    try:
        with EvictionCounter(metrics_url) as evictions:
            setup = ClientSetup(url=url, namespace=f"soak-{uuid.uuid4().hex[:12]}", block_bytes=cfg.block_bytes,
                                batch=cfg.batch, window=cfg.window, max_message_bytes=cfg.max_message_bytes,
                                stall_s=cfg.stream_idle_timeout_s + STALL_GRACE_S, tally=Tally(),
                                stop=threading.Event(),
                                evictions_polled=lambda: evictions.polled, evictions_now=evictions.now)
            ran_s = _run_clients(cfg, setup, monitor)
            summary = monitor.stop()
            return _report(cfg, setup.tally, ran_s, summary, evictions)
    finally:
        monitor.close()


def run_soak(cfg: SoakConfig) -> SoakReport:
    """Run the soak described by `cfg` (validated first) and return its report, `failures` filled in."""
    cfg.validate()
    if cfg.url:
        report = _soak(cfg, cfg.url, cfg.health_url or cfg.url, cfg.metrics_url, cfg.daemon_pid)
    else:
        with tempfile.TemporaryDirectory(prefix="kvstore-soak-") as workdir:
            daemon = SpawnedDaemon(Path(workdir), {"tiers": [{"type": "memory", "bytes": cfg.memory_bytes}],
                                                   "max_message_bytes": cfg.max_message_bytes,
                                                   "stream_idle_timeout_s": cfg.stream_idle_timeout_s})
            with daemon:
                report = _soak(cfg, daemon.url, daemon.health_url, daemon.metrics_url, daemon.pid)
            report.daemon_exit_code = daemon.exit_code
            report.daemon_log_problems = daemon.problems()
    report.failures = failures(report, cfg)
    return report


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f} MiB"


def format_table(report: SoakReport) -> str:
    """The report as a two-column table, for the terminal."""
    health, rss = report.health, report.rss
    rows = [
        ("duration", f"{report.duration_s:g} s"),
        ("clients", ", ".join(f"{kind} {n}" for kind, n in report.clients.items())
                    + (f" (nice {report.clients_nice})" if report.clients_nice else "")),
        ("puts / gets", f"{report.puts:,} / {report.gets:,}"),
        ("bytes put / read back", f"{_mib(report.bytes_put)} / {_mib(report.bytes_got)}"),
        ("blocks verified", f"{report.blocks_verified:,}"),
        ("wrong bytes", f"{report.wrong_bytes} (in {report.wrong_blocks} blocks)"),
        ("lost acknowledged blocks", str(report.lost_blocks)),
        ("misses after evictions", f"{report.misses_after_eviction} (evictions: "
                                   f"{'unknown' if report.evictions is None else f'{report.evictions:g}'})"),
        ("health checks", f"{health['checks']:,}, failed {health['failures']}, over {health['slow_ms']:g} ms "
                          f"{health['slow']}"),
        ("health latency", f"p50 {health['p50_ms']:.1f} ms, p99 {health['p99_ms']:.1f} ms, "
                           f"max {health['max_ms']:.1f} ms"),
        ("daemon RSS", f"start {_mib(rss['start_bytes'])}, max {_mib(rss['max_bytes'])}, "
                       f"budget {_mib(rss['budget_bytes'])}, max/budget {rss.get('max_over_budget', '-')}, "
                       f"max - 1.5 x budget {_mib(rss.get('max_minus_1_5_budget_bytes'))}"),
        ("inflight Put bytes after", _mib(report.inflight_put_bytes_after)),
    ]
    for kind, codes in report.statuses.items():
        rows.append((f"statuses: {kind}", ", ".join(f"{code} {n:,}" for code, n in sorted(codes.items())) or "-"))
    if report.daemon_exit_code is not None:
        rows.append(("daemon exit code", str(report.daemon_exit_code)))
    rows.append(("daemon log errors", str(len(report.daemon_log_problems))))
    rows.append(("result", "PASS" if not report.failures else "FAIL: " + "; ".join(report.failures)))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
