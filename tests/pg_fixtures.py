"""Session fixtures: one PostgreSQL server and one SeaweedFS S3 server,
started on first use and stopped at the end of the session.

When ``CI`` is set and a server cannot be installed or started, the tests
that need it fail; elsewhere they skip, saying why.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from pg_servers import ACCESS_KEY, SECRET_KEY, PostgresServer, S3Server, ServerUnavailable

if TYPE_CHECKING:
    from blobleases.postgres_storage import PostgresStorage

__all__ = [
    "BUCKET",
    "postgres_server",
    "postgres_started",
    "s3_environment",
    "s3_server",
    "s3_store",
    "unavailable",
]

#: The bucket the S3 fixture creates.
BUCKET = "blobleases-test"


def unavailable(what: str, reason: str) -> NoReturn:
    """Fail under CI, skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI: {reason}", pytrace=False)
    pytest.skip(f"{what} unavailable: {reason}")


@contextmanager
def s3_environment() -> Iterator[None]:
    """The AWS environment variables that give the S3 fixture's key pair
    (inherited by child processes started inside the block)."""
    names = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def s3_store(
    postgres: PostgresServer, s3: S3Server, tag: str, **policies: Any
) -> Iterator[PostgresStorage]:
    """A PostgresStorage on the S3 tier in a fresh namespace named
    ``<tag>-<hex>`` (its key prefix too), inside :func:`s3_environment`."""
    from blobleases.postgres_storage import PostgresStorage  # needs the extra

    namespace = f"{tag}-{uuid.uuid4().hex[:12]}"
    blobs = f"s3://{BUCKET}/{namespace}?endpoint={s3.endpoint}"
    with (
        s3_environment(),
        PostgresStorage(postgres.dsn, blobs=blobs, namespace=namespace, **policies) as storage,
    ):
        yield storage


@contextmanager
def postgres_started() -> Iterator[PostgresServer]:
    """A new PostgreSQL server on loopback (durability off; ``unavailable``
    if it cannot start), closed at the end."""
    try:
        server = PostgresServer()
    except ServerUnavailable as exc:
        unavailable("PostgreSQL", str(exc))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server on loopback (durability off)."""
    with postgres_started() as server:
        yield server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """SeaweedFS with S3 on loopback and the bucket ``BUCKET``."""
    try:
        server = S3Server()
        server.create_bucket(BUCKET)
    except ServerUnavailable as exc:
        unavailable("SeaweedFS (weed server -s3)", str(exc))
    try:
        yield server
    finally:
        server.close()
