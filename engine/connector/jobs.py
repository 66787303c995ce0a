"""What the connector's scheduler side hands its worker side: blocks to save, blocks to load, results."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field


@dataclass
class SaveJob:
    """Blocks of one request to save: their keys and, for each, its pages (in order)."""

    keys: list[bytes]
    page_ids: list[int]          # len(keys) * pages_per_block
    tiers: list[str] | None
    ttl_s: float | None


@dataclass
class LoadJob:
    """Blocks of one request to load into its freshly allocated pages."""

    request_id: str
    keys: list[bytes]
    page_ids: list[int]          # pages to fill, len(keys) * pages_per_block
    skip_pages: int              # leading pages the GPU prefix cache already holds: not written
    tiers: list[str] = field(default_factory=list)   # the tier the lookup found each block in
    started: float = field(default_factory=time.perf_counter)


@dataclass
class LoadResult:
    request_id: str
    blocks_loaded: int           # leading blocks delivered intact (the rest is recomputed)


def wait_drained(jobs: queue.Queue, timeout: float) -> bool:
    """Wait until every job put on `jobs` is done (`task_done`); False on timeout."""
    deadline = time.monotonic() + timeout
    while jobs.unfinished_tasks:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)
    return True
