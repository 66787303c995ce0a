"""Shared fixtures: real Redis and S3 (moto) services, started once per session.

pytest puts `tests/` on sys.path for this file, so tests import the helpers as `fixtures_services`.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from fixtures_services import make_bucket, start_moto, start_redis


@pytest.fixture(scope="session")
def redis_url():
    """A redis-server shared by the session (use `start_redis()` to get one you may stop)."""
    url, stop, _ = start_redis()
    yield url
    stop()


@pytest.fixture(scope="session")
def moto_endpoint():
    """host:port of a moto S3 server shared by the session."""
    endpoint, stop = start_moto()
    yield endpoint
    stop()


@pytest.fixture
def s3_bucket(moto_endpoint):
    """A fresh bucket on the session's moto server: (endpoint, bucket)."""
    bucket = f"tierkv-{uuid.uuid4().hex[:12]}"
    make_bucket(moto_endpoint, bucket)
    return moto_endpoint, bucket


def _shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("tierkv-*")}


@pytest.fixture
def no_shm_leftovers():
    """The test leaves /dev/shm as it found it (a daemon unlinks its slab segment when it stops)."""
    before = _shm_segments()
    yield
    deadline = time.monotonic() + 5
    while _shm_segments() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _shm_segments() - before == set()
