"""The fault harness: a real `tierkv serve` process offloading to a real `kvstore serve` daemon
(memory -> Redis -> S3), fed concurrent /v1/completions requests that share long prefixes while
the daemon, Redis and S3 are killed, stopped, corrupted and fed misplaced values.

Used by tests/reliability/test_fault_harness.py; `python -m tests.reliability.harness` runs it alone
and prints the figures (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # fixtures_services, as tests/conftest.py imports it

from fixtures_services import free_port, make_bucket, obj_tier, s3_client, start_moto, start_redis  # noqa: E402
from kvstore.checksum import HEADER_BYTES  # noqa: E402

BLOCK = 256                 # tokens per offloaded block
PREFIX_BLOCKS = 4           # each shared prefix: 4 full blocks (1024 tokens)
NUM_PREFIXES = 5            # 20 distinct blocks of 128 KiB: 2.5 MiB, the memory tier holds 1 MiB
MAX_TOKENS = 4
CLIENTS = 3
REQUEST_TIMEOUT_S = 60.0
BUCKET = "tierkv-reliability"
SERVE_FLAGS = ("--dtype", "float32", "--max-model-len", "2048", "--num-gpu-blocks-override", "512",
               "--seed", "0", "--no-enable-prefix-caching", "--host", "127.0.0.1",
               "--uvicorn-log-level", "warning")


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


PREFIXES = [tokens(100 + p, PREFIX_BLOCKS * BLOCK) for p in range(NUM_PREFIXES)]
# Prefixes first sent while S3 is down, so their saves meet the outage (12 more blocks).
S3_PHASE_PREFIXES = [tokens(200 + p, PREFIX_BLOCKS * BLOCK) for p in range(3)]
S3_PHASE = range(108, 144)   # the indexes of the S3 phase's requests (phase 4 of 36)


def prompt(i: int) -> list[int]:
    """Request i: one of the shared prefixes (round robin) and a suffix of its own (8-39 tokens)."""
    prefixes = S3_PHASE_PREFIXES if i in S3_PHASE else PREFIXES
    return prefixes[i % len(prefixes)] + tokens(10_000 + i, 8 + (i * 7) % 32)


def tierkv_command() -> list[str]:
    import shutil
    script = shutil.which("tierkv")
    return [script] if script else [sys.executable, "-m", "engine.cli"]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: process exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer in {timeout_s} s:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)


class Serve:
    """`tierkv serve MODEL ...` as a process; output in a log file."""

    def __init__(self, model: str, workdir: Path, name: str, *flags: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen([*tierkv_command(), "serve", model, *SERVE_FLAGS, *flags, "--port", str(self.port)],
                                     stdout=self._out, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        _wait_http(f"{self.base_url}/health", self.proc, self.log, 120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


class Daemon:
    """`kvstore serve --config` as a process on a fixed port (so a restart comes back where the
    engine looks), with its Prometheus /metrics on another fixed port."""

    def __init__(self, config: dict, workdir: Path) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"grpc://127.0.0.1:{self.port}"
        self.config_path = workdir / "kvstore.json"
        self.config_path.write_text(json.dumps(config))
        self.workdir = workdir
        self.starts = 0
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.starts += 1
        log = self.workdir / f"kvstore-{self.starts}.log"
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvstore.cli", "--log-level", "WARNING", "serve", "--config",
                 str(self.config_path), "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                 "--grace", "0"],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 30
        while "serving on" not in log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"kvstore serve did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()   # SIGKILL: no cleanup, in-flight calls cut
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def metrics(self) -> dict[str, float]:
        return scrape(f"http://127.0.0.1:{self.metrics_port}/metrics", ("kvstore_tier_",))


def scrape(url: str, prefixes: tuple[str, ...]) -> dict[str, float]:
    """Counter samples (name{labels} -> value) of a /metrics page whose names start with `prefixes`."""
    out: dict[str, float] = {}
    text = httpx.get(url, timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(prefixes) and s.name.endswith("_total"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


@dataclass
class Outcome:
    index: int
    phase: str
    status: int | None = None
    error: str | None = None
    text: str | None = None
    tokens: list[str] | None = None
    logprobs: list[float] | None = None
    seconds: float = 0.0


def complete(client: httpx.Client, i: int, phase: str = "") -> Outcome:
    out = Outcome(i, phase)
    body = {"prompt": prompt(i), "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0}
    started = time.monotonic()
    try:
        response = client.post("/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S)
        out.status = response.status_code
        if response.status_code == 200:
            choice = response.json()["choices"][0]
            out.text = choice["text"]
            out.tokens = choice["logprobs"]["tokens"]
            out.logprobs = choice["logprobs"]["token_logprobs"]
        else:
            out.error = response.text[:500]
    except httpx.HTTPError as error:
        out.error = f"{type(error).__name__}: {error}"
    out.seconds = time.monotonic() - started
    return out


def run_all(base_url: str, indexes: list[int]) -> dict[int, Outcome]:
    """Send these requests from the client threads; index -> outcome."""
    with httpx.Client(base_url=base_url) as client, ThreadPoolExecutor(CLIENTS) as pool:
        return {o.index: o for o in pool.map(lambda i: complete(client, i), indexes)}


@dataclass
class Phase:
    name: str
    requests: int
    break_it: callable = None      # called once `break_after` requests of the phase are done (0: before any is sent)
    repair: callable = None        # called once `repair_after` more are done (or `repair_after_s` passed)
    break_after: int = 6
    repair_after: int = 12
    repair_after_s: float = 20.0
    notes: dict = field(default_factory=dict)


def run_phase(base_url: str, phase: Phase, first: int) -> list[Outcome]:
    done = threading.Semaphore(0)
    outcomes: list[Outcome] = []

    def one(client: httpx.Client, i: int) -> None:
        outcomes.append(complete(client, i, phase.name))
        done.release()

    with httpx.Client(base_url=base_url) as client, ThreadPoolExecutor(CLIENTS) as pool:
        if phase.break_it is not None and phase.break_after == 0:  # a fault at rest, before the phase
            phase.notes.update(phase.break_it() or {})
        futures = [pool.submit(one, client, i) for i in range(first, first + phase.requests)]
        if phase.break_it is not None and phase.break_after > 0:  # a fault while requests run
            for _ in range(phase.break_after):
                done.acquire()
            phase.notes.update(phase.break_it() or {})
        if phase.repair is not None:
            deadline = time.monotonic() + phase.repair_after_s
            for _ in range(phase.repair_after):
                if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    break
            phase.repair()
            phase.notes["repaired_at"] = time.monotonic()
        for future in futures:
            future.result()
    return outcomes


def settle(base_url: str, indexes: list[int], phase: str, timeout_s: float = 30.0) -> tuple[list[Outcome], float, bool]:
    """Send probe requests (prompts of the phase, one at a time) until one makes the engine look the
    store up again: after a fault the connector skips lookups for a back-off (0.5 s doubling per
    failure, up to 10 s), and the next fault should meet a store in use. The probes are checked like
    every other request; returns them, the seconds it took and whether the engine looked up again."""
    started = time.monotonic()
    probes: list[Outcome] = []
    metrics_url = f"{base_url}/metrics"
    with httpx.Client(base_url=base_url) as client:
        while True:
            before = scrape(metrics_url, ("tierkv_offload_lookups",)).get("tierkv_offload_lookups_total", 0)
            probes.append(complete(client, indexes[len(probes) % len(indexes)], phase + ":probe"))
            after = scrape(metrics_url, ("tierkv_offload_lookups",)).get("tierkv_offload_lookups_total", 0)
            if after > before or time.monotonic() - started > timeout_s:
                return probes, time.monotonic() - started, after > before
            time.sleep(0.2)


# ---- faults on the stored values --------------------------------------------------------------

def _flip(value: bytes, offset: int) -> bytes:
    data = bytearray(value)
    data[offset] ^= 0xFF
    return bytes(data)


def corrupt_redis(url: str) -> int:
    """Flip one payload byte of every block in Redis; the number flipped."""
    r = redis.Redis.from_url(url)
    count = 0
    for key in r.scan_iter(match=b"tierkv:*"):
        value = r.get(key)
        if value is None or len(value) <= HEADER_BYTES:
            continue
        offset = HEADER_BYTES + (len(value) - HEADER_BYTES) // 2
        r.set(key, _flip(value, offset), keepttl=True)
        count += 1
    return count


def corrupt_s3(endpoint: str, bucket: str) -> int:
    """Flip one payload byte of every block object in the bucket; the number flipped."""
    s3 = s3_client(endpoint)
    count = 0
    for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        value = _s3_read(s3, bucket, obj["Key"])
        if value is None or len(value) <= HEADER_BYTES:
            continue
        s3.put_object(Bucket=bucket, Key=obj["Key"], Body=_flip(value, HEADER_BYTES + 17))
        count += 1
    return count


def misplace_redis(url: str) -> int:
    """Copy each block's valid value under the next block's key (a rotation): every value is a
    real, intact frame, stored under a key it was not written for."""
    r = redis.Redis.from_url(url)
    keys = sorted(r.scan_iter(match=b"tierkv:*"))
    values = [r.get(k) for k in keys]
    pairs = [(k, v) for k, v in zip(keys, values) if v is not None]
    for (key, _), (_, value) in zip(pairs, pairs[1:] + pairs[:1]):
        r.set(key, value)
    return len(pairs) if len(pairs) > 1 else 0


def misplace_s3(endpoint: str, bucket: str) -> int:
    s3 = s3_client(endpoint)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))
    pairs = [(k, v) for k in keys if (v := _s3_read(s3, bucket, k)) is not None]
    for (key, _), (_, value) in zip(pairs, pairs[1:] + pairs[:1]):
        s3.put_object(Bucket=bucket, Key=key, Body=value)
    return len(pairs) if len(pairs) > 1 else 0


def _s3_read(s3, bucket: str, key: str) -> bytes | None:
    """An object's bytes, or None if the store deleted it meanwhile (the engine runs on)."""
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None


# ---- the run ----------------------------------------------------------------------------------

@dataclass
class Report:
    sent: int = 0
    ok: int = 0
    equal: int = 0
    phases: list[dict] = field(default_factory=list)
    server_metrics: dict[str, float] = field(default_factory=dict)
    daemon_metrics: dict[str, float] = field(default_factory=dict)
    mismatches: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def same(a: Outcome, ref: Outcome) -> bool:
    """The exact text and the exact per-token strings of the no-store run (and its logprobs within
    1e-3: a different token with the same text would also have another logprob)."""
    return (a.text == ref.text and a.tokens == ref.tokens and len(a.logprobs) == len(ref.logprobs)
            and all(abs(x - y) < 1e-3 for x, y in zip(a.logprobs, ref.logprobs)))


def run(model: str, workdir: Path, requests_per_phase: int = 36) -> Report:
    assert S3_PHASE == range(3 * requests_per_phase, 4 * requests_per_phase)
    started = time.monotonic()
    report = Report()
    phase_names = ["warm", "daemon_sigkill_restart", "redis_stop_restart", "s3_down_up",
                   "corrupt_redis_and_s3", "misplaced_values"]
    total = requests_per_phase * len(phase_names)

    # 1. The reference: the same server without --kv-transfer-config.
    reference_server = Serve(model, workdir, "serve-reference")
    try:
        reference = run_all(reference_server.base_url, list(range(total)))
    finally:
        reference_server.stop()
    bad = [o for o in reference.values() if o.status != 200]
    assert not bad, f"the no-store reference run failed: {bad[:3]}"

    # 2. The services and the daemon: memory (1 MiB, 8 blocks) -> Redis -> S3.
    redis_url, redis_stop, redis_restart = start_redis()
    moto_endpoint, moto_stop = start_moto()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto = {"endpoint": moto_endpoint, "stop": moto_stop}
    make_bucket(moto_endpoint, BUCKET)
    daemon = Daemon({"listen": "127.0.0.1:0", "tiers": [
        {"type": "memory", "bytes": "1MiB"},
        {"type": "redis", "url": redis_url, "connect_timeout_s": 0.2, "socket_timeout_s": 1.0},
        obj_tier(moto_endpoint, BUCKET, connect_timeout_s=0.2, read_timeout_s=2.0, max_attempts=1),
    ]}, workdir)
    kv_config = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                 "kv_connector_extra_config": {
                     "block_size": BLOCK, "load_cost_model": False, "kvstore_url": daemon.url,
                     "load_timeout_s": 3.0, "lookup_timeout_s": 1.0,
                     "policy": {"name": "save_all", "tiers": ["memory", "redis", "obj"]}}}
    server = None
    try:
        server = Serve(model, workdir, "serve-offload", "--kv-transfer-config", json.dumps(kv_config))

        def moto_down():
            moto["stop"]()

        def moto_up():
            port = int(moto["endpoint"].rsplit(":", 1)[1])
            _, moto["stop"] = start_moto(port)
            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's state is per process: the bucket is still there

        def daemon_kill():
            daemon.kill()

        phases = [
            Phase("warm", requests_per_phase),
            Phase("daemon_sigkill_restart", requests_per_phase, daemon_kill, daemon.start),
            Phase("redis_stop_restart", requests_per_phase, redis_stop, redis_restart),
            # S3 goes down before requests with new prefixes arrive: their saves meet the outage.
            Phase("s3_down_up", requests_per_phase, moto_down, moto_up, break_after=0),
            Phase("corrupt_redis_and_s3", requests_per_phase,
                  lambda: {"redis_values_flipped": corrupt_redis(redis_url),
                           "s3_objects_flipped": corrupt_s3(moto["endpoint"], BUCKET)}, break_after=0),
            Phase("misplaced_values", requests_per_phase,
                  lambda: {"redis_values_misplaced": misplace_redis(redis_url),
                           "s3_objects_misplaced": misplace_s3(moto["endpoint"], BUCKET)}, break_after=0),
        ]
        assert [p.name for p in phases] == phase_names
        metrics_url = f"{server.base_url}/metrics"
        first = 0
        for phase in phases:
            server_before = scrape(metrics_url, ("tierkv_offload_",))
            daemon_before = daemon.metrics()
            phase_started = time.monotonic()
            outcomes = run_phase(server.base_url, phase, first)
            probes, settle_s, store_in_use = settle(server.base_url, list(range(first, first + phase.requests)), phase.name)
            repaired_at = phase.notes.pop("repaired_at", None)
            if repaired_at is not None:
                phase.notes["store_in_use_again_after_repair_s"] = round(time.monotonic() - repaired_at, 1)
            phase.notes["probes"] = len(probes)
            phase.notes["store_in_use_at_end"] = store_in_use
            phase.notes["settle_s"] = round(settle_s, 1)
            outcomes += probes
            ok = [o for o in outcomes if o.status == 200]
            equal = [o for o in ok if same(o, reference[o.index])]
            for o in outcomes:
                if o.status != 200:
                    report.failures.append({"index": o.index, "phase": o.phase, "status": o.status, "error": o.error})
                elif not same(o, reference[o.index]):
                    report.mismatches.append({"index": o.index, "phase": o.phase, "got": o.text,
                                              "want": reference[o.index].text})
            server_delta = delta(scrape(metrics_url, ("tierkv_offload_",)), server_before)
            # The daemon restarted in its phase: its counters start again from 0.
            daemon_now = daemon.metrics()
            daemon_delta = daemon_now if phase.name == "daemon_sigkill_restart" else delta(daemon_now, daemon_before)
            report.phases.append({
                "phase": phase.name, "sent": len(outcomes), "ok": len(ok), "equal": len(equal),
                "max_seconds": round(max(o.seconds for o in outcomes), 2),
                "seconds": round(time.monotonic() - phase_started, 1), **phase.notes,
                "server": server_delta, "daemon": {k: v for k, v in daemon_delta.items()
                                                   if "corrupt" in k or "errors" in k or "hits" in k}})
            report.sent += len(outcomes)
            report.ok += len(ok)
            report.equal += len(equal)
            first += phase.requests
        report.server_metrics = scrape(metrics_url, ("tierkv_offload_",))
        report.daemon_metrics = daemon.metrics()
    finally:
        if server is not None:
            server.stop()
        daemon.stop()
        redis_stop()
        with contextlib.suppress(Exception):
            moto["stop"]()
    report.seconds = round(time.monotonic() - started, 1)
    return report


def main() -> None:
    from tests.engine.tiny_models import make_tiny_model

    workdir = Path(tempfile.mkdtemp(prefix="tierkv-reliability-"))
    model = make_tiny_model(workdir / "llama", "llama", max_position_embeddings=2048)
    report = run(model, workdir)
    print(json.dumps(report.__dict__, indent=1, default=str))


if __name__ == "__main__":
    main()
