"""Random operation sequences on RedisStorage (standalone and cluster) agree
with the model of the conformance suite."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from blobleases.redis_storage import RedisStorage
from blobleases.storage import BlobStorage
from redis_servers import RedisCluster, RedisServer
from state_machines import machine_test_case

pytestmark = pytest.mark.redis

_CHILD = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
_URLS: dict[str, str] = {}


def _factory(kind: str) -> BlobStorage:
    return RedisStorage(_URLS[kind], namespace=f"p-{uuid.uuid4().hex[:12]}", chunk_size=16 * 1024)


def _case(name: str, kind: str) -> type[Any]:
    return machine_test_case(name, lambda: _factory(kind), _CHILD.pid, max_examples=15, steps=30)


class TestRedisStandaloneMachine(_case("RedisStandaloneMachine", "standalone")):
    @pytest.fixture(autouse=True)
    def _server(self, redis_server: RedisServer) -> Iterator[None]:
        _URLS["standalone"] = redis_server.url
        yield


class TestRedisClusterMachine(_case("RedisClusterMachine", "cluster")):
    @pytest.fixture(autouse=True)
    def _server(self, redis_cluster: RedisCluster) -> Iterator[None]:
        _URLS["cluster"] = redis_cluster.url
        yield


def teardown_module() -> None:
    _CHILD.kill()
    _CHILD.wait()
