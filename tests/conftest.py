"""Shared pytest configuration for the blobleases test suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from blobleases import registry
from pg_fixtures import postgres_server, s3_server  # noqa: F401 (session fixtures)
from redis_fixtures import redis_cluster, redis_server  # noqa: F401 (session fixtures)


@pytest.fixture(autouse=True)
def _isolated_registry() -> Iterator[None]:
    """Each test starts and ends with no registered storage and no stores
    opened on behalf of unpickled leases."""
    registry.unregister_storage()
    yield
    registry.unregister_storage()
    registry.close_opened_stores()
