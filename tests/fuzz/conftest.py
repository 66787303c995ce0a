"""Fuzz tests: report how many examples each interface ran."""

from __future__ import annotations

from fuzz_common import EXAMPLES_RUN, LONG, OUTCOMES


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not EXAMPLES_RUN:
        return
    terminalreporter.section(f"fuzz examples run per interface ({'long' if LONG else 'ci'} profile)")
    for interface, n in sorted(EXAMPLES_RUN.items()):
        terminalreporter.write_line(f"{interface}: {n}")
    terminalreporter.write_line(f"total: {sum(EXAMPLES_RUN.values())}")
    results = ", ".join(f"{family} {result}: {n}" for (family, result), n in sorted(OUTCOMES.items()))
    terminalreporter.write_line(f"outcomes: {results}")
