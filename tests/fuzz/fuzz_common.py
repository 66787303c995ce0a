"""Shared settings of the property-based fuzz tests (hypothesis) and the per-interface example counts.

CI runs a few hundred examples per interface (the whole directory in well under two minutes on two
cores); the long run raises every interface to at least 10,000:

    HYPOTHESIS_PROFILE=long pytest tests/fuzz -p no:cacheprovider -o timeout=0

`FUZZ_EXAMPLES=N` sets the count of every interface directly (it wins over the profile).
"""

from __future__ import annotations

import os
from collections import Counter

from hypothesis import HealthCheck, settings

LONG = os.environ.get("HYPOTHESIS_PROFILE", "").lower() == "long"
LONG_EXAMPLES = 10_000

# Examples actually run, per interface; printed at the end of the session (tests/fuzz/conftest.py).
EXAMPLES_RUN: Counter[str] = Counter()
# How they ended (HTTP status, gRPC status code, parser result), to see that the fuzzing reaches both
# the accepting and the refusing paths.
OUTCOMES: Counter[tuple[str, str]] = Counter()


def fuzz_settings(ci_examples: int) -> settings:
    """Settings of one fuzz test: `ci_examples` in CI, LONG_EXAMPLES (or FUZZ_EXAMPLES) in the long run.

    No deadline (a shared CI machine is slow at times; hangs are caught by the request timeouts), no
    example database (nothing written to the work tree; a failure prints its reproduction blob).
    """
    override = os.environ.get("FUZZ_EXAMPLES")
    examples = int(override) if override else (max(LONG_EXAMPLES, ci_examples) if LONG else ci_examples)
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        print_blob=True,
        derandomize=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.function_scoped_fixture, HealthCheck.large_base_example],
    )


def count(interface: str) -> None:
    EXAMPLES_RUN[interface] += 1


def outcome(interface: str, result: object) -> None:
    OUTCOMES[interface.split(".")[0], str(result)] += 1
