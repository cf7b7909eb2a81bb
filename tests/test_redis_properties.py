"""Random operation sequences on RedisStorage (standalone and cluster) agree
with the model of the conformance suite."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from blobleases.redis_storage import RedisStorage
from blobleases.storage import BlobStorage
from blobleases.testing import storage_state_machine
from redis_servers import RedisCluster, RedisServer

pytestmark = pytest.mark.redis

_CHILD = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
_URLS: dict[str, str] = {}


def _factory(kind: str) -> BlobStorage:
    return RedisStorage(_URLS[kind], namespace=f"p-{uuid.uuid4().hex[:12]}", chunk_size=16 * 1024)


_SETTINGS = settings(
    max_examples=15,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Hypothesis keys a state machine's saved examples by the source of its class:
# subclasses defined here keep the Redis examples apart from other backends'.


class StandaloneMachine(storage_state_machine(lambda: _factory("standalone"), _CHILD.pid)):  # type: ignore[misc]
    """Redis standalone: its own example database key."""


class ClusterMachine(storage_state_machine(lambda: _factory("cluster"), _CHILD.pid)):  # type: ignore[misc]
    """Redis Cluster: its own example database key."""


StandaloneMachine.TestCase.settings = _SETTINGS
ClusterMachine.TestCase.settings = _SETTINGS


class TestRedisStandaloneMachine(StandaloneMachine.TestCase):  # type: ignore[misc,name-defined]
    @pytest.fixture(autouse=True)
    def _server(self, redis_server: RedisServer) -> Iterator[None]:
        _URLS["standalone"] = redis_server.url
        yield


class TestRedisClusterMachine(ClusterMachine.TestCase):  # type: ignore[misc,name-defined]
    @pytest.fixture(autouse=True)
    def _server(self, redis_cluster: RedisCluster) -> Iterator[None]:
        _URLS["cluster"] = redis_cluster.url
        yield


def teardown_module() -> None:
    _CHILD.kill()
    _CHILD.wait()
