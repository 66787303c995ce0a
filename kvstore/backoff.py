"""Exponential backoff, the one used by every retry in the daemon, its clients and the engine.

`Backoff` is the schedule: `initial_s` after the first failure, `factor` times more after each
further one, at most `max_s`, each delay shortened by up to `jitter` of itself at random (so clients
that failed together do not retry together). Two ways to use it:

* a retry loop that sleeps (the kvstore clients): `Backoff.delay(n)` before attempt n + 1, within
  a total `deadline_s` (`Backoff.fits`);
* a cooldown that never sleeps (a tier's outage, the connector's lookups, the engine's slab leases):
  `Cooldown` says whether a call may go out now, and after a failure when the next may.

A maintained library (tenacity) was weighed and not taken: it wraps a function in a sleeping retry
loop, which covers the clients only (and their asyncio twin through a second API), while the three
cooldowns are state read on a hot path with no loop at all; the schedule itself is a few lines.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delays growing from `initial_s` by `factor` per failure up to `max_s`, minus up to `jitter`
    (a fraction, 0-1) of each at random."""

    initial_s: float
    max_s: float
    factor: float = 2.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(f"backoff: expected 0 < initial_s <= max_s, got {self.initial_s} and {self.max_s}")
        if self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError(f"backoff: expected factor >= 1 and jitter in [0, 1], got {self.factor} and {self.jitter}")

    def delay(self, failures: int) -> float:
        """The wait after `failures` consecutive failures (1 = the first)."""
        exponent = min(max(failures - 1, 0), 64)   # past the cap long before: no float overflow
        base = min(self.max_s, self.initial_s * self.factor**exponent)
        return base * (1 - self.jitter * random.random())

    @staticmethod
    def fits(started: float, delay_s: float, deadline_s: float | None, now: float | None = None) -> bool:
        """Whether waiting `delay_s` more still ends within `deadline_s` of `started` (monotonic)."""
        if deadline_s is None:
            return True
        now = time.monotonic() if now is None else now
        return now + delay_s - started < deadline_s


class Cooldown:
    """A backoff over time without sleeping: after a failure, calls wait until `resume_at`; the
    first success resets it. Not thread-safe: callers on several threads hold their own lock."""

    def __init__(self, backoff: Backoff, clock: Callable[[], float] = time.monotonic):
        self.backoff = backoff
        self._clock = clock
        self.failures = 0
        self.resume_at = 0.0

    @property
    def delay_s(self) -> float:
        """The wait the current outage is at (0 while there is none)."""
        return self.backoff.delay(self.failures) if self.failures else 0.0

    def ready(self) -> bool:
        """Whether a call may go out now."""
        return self.failures == 0 or self._clock() >= self.resume_at

    def claim(self) -> bool:
        """Like `ready`, and when a call is in an outage, push `resume_at` one delay on: this caller is
        the probe, others keep waiting until it has answered."""
        if not self.ready():
            return False
        if self.failures:
            self.resume_at = self._clock() + self.backoff.delay(self.failures)
        return True

    def failed(self) -> float:
        """Count a failure; returns the wait before the next call."""
        self.failures += 1
        wait = self.backoff.delay(self.failures)
        self.resume_at = self._clock() + wait
        return wait

    def succeeded(self) -> None:
        self.failures = 0
        self.resume_at = 0.0
