"""Session fixtures: one standalone redis-server and one 3-master cluster,
started on first use and stopped at the end of the session.

When ``CI`` is set and redis-server cannot be installed or started, the tests
that need it fail; elsewhere they skip, saying why.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

import pytest

from redis_servers import RedisCluster, RedisServer, RedisUnavailable

__all__ = ["redis_cluster", "redis_server", "started", "unavailable"]


def unavailable(reason: str) -> NoReturn:
    """Fail under CI, skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"redis-server is required in CI: {reason}", pytrace=False)
    pytest.skip(f"redis-server unavailable: {reason}")


_T = TypeVar("_T")


@contextmanager
def started(start: Callable[[], _T], stop: Callable[[_T], None]) -> Iterator[_T]:
    """The server ``start()`` makes (``unavailable`` if it cannot), stopped by
    ``stop`` at the end."""
    try:
        server = start()
    except RedisUnavailable as exc:
        unavailable(str(exc))
    try:
        yield server
    finally:
        stop(server)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A standalone redis-server without persistence."""
    directory = tmp_path_factory.mktemp("redis")
    with started(lambda: RedisServer(directory), lambda s: s.stop(kill=True)) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A 3-master Redis Cluster on loopback."""
    directory = tmp_path_factory.mktemp("cluster")
    with started(lambda: RedisCluster(directory), lambda c: c.stop()) as cluster:
        yield cluster
