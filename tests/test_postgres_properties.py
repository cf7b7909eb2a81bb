"""Random operation sequences on PostgresStorage (S3 tier and directory
tier) agree with the model of the conformance suite."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from blobleases.postgres_storage import PostgresStorage
from blobleases.storage import BlobStorage
from pg_fixtures import BUCKET, s3_environment
from pg_servers import PostgresServer, S3Server
from state_machines import machine_test_case

pytestmark = pytest.mark.postgres

_CHILD = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
_WHERE: dict[str, str] = {}
_DIRECTORY = tempfile.TemporaryDirectory(prefix="blobleases-pg-props-")


def _factory(kind: str) -> BlobStorage:
    namespace = f"p-{uuid.uuid4().hex[:12]}"
    if kind == "s3":
        blobs = f"s3://{BUCKET}/{namespace}?endpoint={_WHERE['endpoint']}"
    else:
        blobs = f"{_DIRECTORY.name}/{namespace}"
    return PostgresStorage(_WHERE["dsn"], blobs=blobs, namespace=namespace)


def _case(name: str, kind: str) -> type[Any]:
    return machine_test_case(name, lambda: _factory(kind), _CHILD.pid, max_examples=6, steps=25)


class TestPostgresS3Machine(_case("PostgresS3Machine", "s3")):
    @pytest.fixture(autouse=True)
    def _servers(self, postgres_server: PostgresServer, s3_server: S3Server) -> Iterator[None]:
        _WHERE["dsn"] = postgres_server.dsn
        _WHERE["endpoint"] = s3_server.endpoint
        with s3_environment():
            yield


class TestPostgresDirectoryMachine(_case("PostgresDirectoryMachine", "dir")):
    @pytest.fixture(autouse=True)
    def _servers(self, postgres_server: PostgresServer) -> Iterator[None]:
        _WHERE["dsn"] = postgres_server.dsn
        yield


def teardown_module() -> None:
    _CHILD.kill()
    _CHILD.wait()
    _DIRECTORY.cleanup()
