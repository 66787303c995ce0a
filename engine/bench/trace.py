"""A profiler trace of one stretch of a benchmark: where a hit's or a step's time went, on the host
and on the device. Kept as a Chrome trace (open it in Perfetto) and a table of the top ops."""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)


@contextmanager
def profiled(trace_dir: str | None, name: str) -> Iterator[None]:
    """Profile the body into `trace_dir/name.json.gz` and `trace_dir/name.txt` (ops by self device
    time, or self CPU time without CUDA); a no-op without `trace_dir`."""
    if trace_dir is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    on_cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        yield
        if on_cuda:
            torch.cuda.synchronize()  # the body's device work finishes inside the recording
    os.makedirs(trace_dir, exist_ok=True)
    path = os.path.join(trace_dir, f"{name}.json.gz")
    with tempfile.TemporaryDirectory(prefix="tierkv-bench-trace-") as tmp:
        raw = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
    sort_by = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    with open(os.path.join(trace_dir, f"{name}.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by=sort_by, row_limit=40))
    logger.info("profiler trace of %s in %s", name, path)
