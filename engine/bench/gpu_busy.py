"""GPU busy %: the fraction of wall time during engine steps when the GPU runs a kernel, a copy or a
memset. The CPU overhead of the step loop (scheduling, input preparation, Python) shows up as the
idle remainder: with async scheduling and CUDA graphs the GPU should never wait on the CPU.

Measured with the torch profiler (CUPTI): the union of the device activity intervals inside the window
from the first profiled step's start to the last one's end, over the window's length. The first steps
under the profiler run while it sets up its buffers; they are profiled but left out (its `warmup`
phase), so the profiler's own start does not count as the GPU waiting.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Callable, Iterable

import torch

STEP_MARK = "tierkv_bench_step"
# Chrome-trace categories of work on the device; "gpu_user_annotation" spans are markers, not work.
DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
WARMUP_STEPS = 5  # profiled but not measured: the profiler's own start-up


def busy_fraction(intervals: Iterable[tuple[float, float]], window: tuple[float, float]) -> float:
    """Length of the union of `intervals` clipped to `window`, over the window's length."""
    lo, hi = window
    if hi <= lo:
        raise ValueError(f"the window must have positive length, got {window}")
    clipped = sorted((max(s, lo), min(e, hi)) for s, e in intervals if e > lo and s < hi)
    busy = 0.0
    cur_start = cur_end = None
    for start, end in clipped:
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        busy += cur_end - cur_start
    return busy / (hi - lo)


def trace_intervals(trace: dict) -> tuple[list[tuple[float, float]], tuple[float, float]]:
    """From a Chrome trace (the profiler's export): device work intervals and the step window (µs)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    steps = [(e["ts"], e["ts"] + e["dur"]) for e in events
             if e.get("name") == STEP_MARK and e.get("cat") != "gpu_user_annotation"]
    if not steps:
        raise ValueError(f"the trace holds no {STEP_MARK!r} spans")
    work = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in DEVICE_WORK]
    return work, (min(s for s, _ in steps), max(e for _, e in steps))


def profile_steps(step: Callable[[], object], num_steps: int, warmup_steps: int = WARMUP_STEPS) -> dict:
    """Run `step` `warmup_steps + num_steps` times under the profiler; the Chrome trace of the last
    `num_steps`, each inside a `STEP_MARK` span."""
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    on_cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with tempfile.TemporaryDirectory(prefix="tierkv-bench-trace-") as tmp:
        path = os.path.join(tmp, "trace.json")
        with profile(activities=activities, schedule=schedule(wait=0, warmup=warmup_steps, active=num_steps, repeat=1),
                     on_trace_ready=lambda p: p.export_chrome_trace(path)) as prof:
            for i in range(warmup_steps + num_steps):
                with record_function(STEP_MARK):
                    step()
                if on_cuda and i == warmup_steps + num_steps - 1:
                    torch.cuda.synchronize()  # the last step's kernels finish inside the recording
                prof.step()
        with open(path) as f:
            return json.load(f)


def measure(step: Callable[[], object], num_steps: int, warmup_steps: int = WARMUP_STEPS,
            trace_path: str | None = None) -> tuple[float, int]:
    """Busy fraction over `num_steps` profiled steps after `warmup_steps`, and the device intervals seen.

    `trace_path` keeps the Chrome trace (gzipped when it ends in .gz), to see where the GPU waited.
    Without CUDA only the CPU is profiled: the fraction is 0 (nothing runs on a device).
    """
    trace = profile_steps(step, num_steps, warmup_steps)
    if trace_path:
        with (gzip.open if trace_path.endswith(".gz") else open)(trace_path, "wt") as f:
            json.dump(trace, f)
    work, window = trace_intervals(trace)
    return busy_fraction(work, window), len(work)
