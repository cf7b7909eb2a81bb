"""Session fixtures: one standalone redis-server and one 3-master cluster,
started on first use and stopped at the end of the session.

When ``CI`` is set and redis-server cannot be installed or started, the tests
that need it fail; elsewhere they skip, saying why.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from redis_servers import (
    RedisCluster,
    RedisServer,
    RedisUnavailable,
    temporary_directory,
)

__all__ = ["redis_cluster", "redis_server", "unavailable"]


def unavailable(reason: str) -> None:
    """Fail under CI, skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"redis-server is required in CI: {reason}", pytrace=False)
    pytest.skip(f"redis-server unavailable: {reason}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A standalone redis-server without persistence."""
    directory = temporary_directory("blobleases-redis-")
    try:
        server = RedisServer(directory)
    except RedisUnavailable as exc:
        shutil.rmtree(directory, ignore_errors=True)
        unavailable(str(exc))
        raise
    try:
        yield server
    finally:
        server.stop(kill=True)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A 3-master Redis Cluster on loopback."""
    directory = temporary_directory("blobleases-cluster-")
    try:
        cluster = RedisCluster(directory)
    except RedisUnavailable as exc:
        shutil.rmtree(directory, ignore_errors=True)
        unavailable(str(exc))
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
