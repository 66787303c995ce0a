"""kvstore test fixtures: services a test may stop, and a Redis Cluster."""

from __future__ import annotations

import logging

import pytest

from fixtures_services import redis_cluster_binaries, start_redis, start_redis_cluster

logging.getLogger("werkzeug").setLevel(logging.WARNING)


@pytest.fixture
def own_redis():
    """A redis-server this test alone uses and may stop: (url, stop, restart)."""
    url, stop, restart = start_redis()
    yield url, stop, restart
    stop()


@pytest.fixture(scope="module")
def redis_cluster():
    """A 3-master Redis Cluster (no replicas) on loopback: (url of one node, [node addresses])."""
    if redis_cluster_binaries() is None:
        pytest.skip("redis-server and redis-cli are not installed (apt-get install redis-server): "
                    "no Redis Cluster to test the cluster tier against")
    url, nodes, stop, _ = start_redis_cluster()
    yield url, nodes
    stop()


@pytest.fixture
def own_redis_cluster():
    """A Redis Cluster this test alone uses and may stop: (url, nodes, stop, restart)."""
    if redis_cluster_binaries() is None:
        pytest.skip("redis-server and redis-cli are not installed (apt-get install redis-server): "
                    "no Redis Cluster to test the cluster tier against")
    url, nodes, stop, restart = start_redis_cluster()
    yield url, nodes, stop, restart
    stop()
