"""kvstore.backoff: the one exponential backoff (schedule, deadline, cooldown) every retry uses."""

import pytest

from kvstore.backoff import Backoff, Cooldown


def test_delays_double_up_to_the_cap():
    backoff = Backoff(initial_s=0.5, max_s=10.0)
    assert [backoff.delay(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.delay(10_000) == 10.0


def test_jitter_shortens_each_delay_by_at_most_its_fraction():
    backoff = Backoff(initial_s=1.0, max_s=1.0, jitter=0.5)
    delays = [backoff.delay(1) for _ in range(200)]
    assert all(0.5 <= d <= 1.0 for d in delays) and len(set(delays)) > 1


def test_deadline_bounds_the_next_wait():
    assert Backoff.fits(started=100.0, delay_s=0.5, deadline_s=3.0, now=102.0)
    assert not Backoff.fits(started=100.0, delay_s=1.5, deadline_s=3.0, now=102.0)
    assert Backoff.fits(started=100.0, delay_s=1e9, deadline_s=None, now=102.0)


@pytest.mark.parametrize(("initial", "cap", "factor", "jitter"), [(0, 1, 2, 0), (2, 1, 2, 0), (1, 2, 0.5, 0), (1, 2, 2, 1.5)])
def test_bad_schedules_are_refused(initial, cap, factor, jitter):
    with pytest.raises(ValueError):
        Backoff(initial, cap, factor, jitter)


def test_cooldown_waits_after_failures_and_one_probe_goes_out():
    now = [0.0]
    cooldown = Cooldown(Backoff(initial_s=1.0, max_s=4.0), clock=lambda: now[0])
    assert cooldown.ready() and cooldown.claim() and cooldown.delay_s == 0.0
    assert cooldown.failed() == 1.0 and not cooldown.ready()
    now[0] = 1.0
    assert cooldown.claim()          # the probe
    assert not cooldown.claim()      # others wait for its answer
    assert cooldown.failed() == 2.0 and cooldown.resume_at == 3.0
    now[0] = 3.0
    assert cooldown.failed() == 4.0 and cooldown.failed() == 4.0
    cooldown.succeeded()
    assert cooldown.ready() and cooldown.failures == 0 and cooldown.delay_s == 0.0
