"""kvstore test fixtures: services a test may stop."""

from __future__ import annotations

import logging

import pytest

from fixtures_services import start_redis

logging.getLogger("werkzeug").setLevel(logging.WARNING)


@pytest.fixture
def own_redis():
    """A redis-server this test alone uses and may stop: (url, stop, restart)."""
    url, stop, restart = start_redis()
    yield url, stop, restart
    stop()

