"""Outage handling for one tier: fail fast while it is down, probe again with backoff.

While a tier is down, calls skip it without touching the network (a dead Redis must cost
nothing per request); once the backoff has passed, the next call is the probe, and the first
success ends the outage. Each outage is logged once when it starts and once when it ends; every
failed attempt is counted in `kvstore_tier_errors`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from kvstore import tier_metrics
from kvstore.backoff import Backoff, Cooldown
from kvstore.tiers.base import TierError

log = logging.getLogger(__name__)
T = TypeVar("T")


class TierGuard:
    """Tracks whether one tier is up and times and counts its operations."""

    def __init__(self, tier_name: str, initial_backoff_s: float = 0.05, max_backoff_s: float = 2.0):
        self.tier_name = tier_name
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._cooldown = Cooldown(Backoff(initial_backoff_s, max_backoff_s))
        tier_metrics.UP.labels(tier_name).set(1)

    @property
    def up(self) -> bool:
        return self._down_since is None

    def call(self, op: str, fn: Callable[[], T], fallback: T) -> T:
        """`fn()`, or `fallback` if the tier is in an outage or fails now."""
        if not self._claim_attempt():
            return fallback
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as error:  # noqa: BLE001 - no tier failure may escape into the caller
            self._failed(op, error)
            return fallback
        tier_metrics.OP_SECONDS.labels(self.tier_name, op).observe(time.perf_counter() - start)
        self._succeeded()
        return result

    def probe(self, ping: Callable[[], None]) -> bool:
        """Ping now, whatever the backoff says (health checks want the current truth)."""
        try:
            ping()
        except Exception as error:  # noqa: BLE001
            self._failed("ping", error)
            return False
        self._succeeded()
        return True

    def _claim_attempt(self) -> bool:
        if self._down_since is None:
            return True
        with self._lock:
            # This caller is the probe; others keep skipping until it has answered.
            return self._cooldown.claim()

    def _failed(self, op: str, error: Exception) -> None:
        tier_metrics.ERRORS.labels(self.tier_name, op).inc()
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
            self._cooldown.failed()
        tier_metrics.UP.labels(self.tier_name).set(0)
        if first:
            # A TierError is an expected outage; anything else is a bug worth a traceback.
            log.warning("tier %s is down (%s failed: %s); serving from the other tiers, retrying with backoff",
                        self.tier_name, op, error, exc_info=not isinstance(error, TierError))

    def _succeeded(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            if self._down_since is None:
                return
            outage = time.monotonic() - self._down_since
            self._down_since = None
            self._cooldown.succeeded()
        tier_metrics.UP.labels(self.tier_name).set(1)
        log.warning("tier %s recovered after %.1f s", self.tier_name, outage)
