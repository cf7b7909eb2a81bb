"""Random operation sequences on PostgresStorage (S3 tier and directory
tier) agree with the model of the conformance suite."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from blobleases.postgres_storage import PostgresStorage
from blobleases.storage import BlobStorage
from blobleases.testing import storage_state_machine
from pg_fixtures import BUCKET, s3_environment
from pg_servers import PostgresServer, S3Server

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


_SETTINGS = settings(
    max_examples=6,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Hypothesis keys a state machine's saved examples by the source of its class:
# subclasses defined here keep these examples apart from other backends'.


class S3Machine(storage_state_machine(lambda: _factory("s3"), _CHILD.pid)):  # type: ignore[misc]
    """PostgreSQL with the S3 tier: its own example database key."""


class DirectoryMachine(storage_state_machine(lambda: _factory("dir"), _CHILD.pid)):  # type: ignore[misc]
    """PostgreSQL with the directory tier: its own example database key."""


S3Machine.TestCase.settings = _SETTINGS
DirectoryMachine.TestCase.settings = _SETTINGS


class TestPostgresS3Machine(S3Machine.TestCase):  # type: ignore[misc,name-defined]
    @pytest.fixture(autouse=True)
    def _servers(self, postgres_server: PostgresServer, s3_server: S3Server) -> Iterator[None]:
        _WHERE["dsn"] = postgres_server.dsn
        _WHERE["endpoint"] = s3_server.endpoint
        with s3_environment():
            yield


class TestPostgresDirectoryMachine(DirectoryMachine.TestCase):  # type: ignore[misc,name-defined]
    @pytest.fixture(autouse=True)
    def _servers(self, postgres_server: PostgresServer) -> Iterator[None]:
        _WHERE["dsn"] = postgres_server.dsn
        yield


def teardown_module() -> None:
    _CHILD.kill()
    _CHILD.wait()
    _DIRECTORY.cleanup()
