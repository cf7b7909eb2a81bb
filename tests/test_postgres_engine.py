"""PostgresStorage decides retention and eviction with the engine
(blobleases.engine over its SQL): the retention budget holds when the
oldest retained blob is locked by another session, and evictions count in
the store-wide stats. The directory tier, so only PostgreSQL is needed."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from blobleases import LeaseId
from blobleases.postgres_storage import PostgresStorage, _lock_key
from pg_servers import PostgresServer

pytestmark = pytest.mark.postgres


@pytest.fixture
def open_store(postgres_server: PostgresServer, tmp_path: Path) -> Iterator[Any]:
    opened: list[PostgresStorage] = []
    namespace = f"e-{uuid.uuid4().hex[:12]}"

    def open_one(**policies: Any) -> PostgresStorage:
        storage = PostgresStorage(
            postgres_server.dsn, blobs=str(tmp_path / "blobs"), namespace=namespace, **policies
        )
        opened.append(storage)
        return storage

    yield open_one
    for storage in opened:
        storage.close()


def _retained(storage: PostgresStorage, data: bytes) -> Any:
    """Store ``data`` and drop its lease, so it is retained."""
    lid = LeaseId.new()
    cid = storage.store_bytes(data, lid)
    storage.advise_lease_dropped(lid, cid)
    return cid


def test_retain_budget_holds_when_the_oldest_retained_is_locked(
    open_store: Any, postgres_server: PostgresServer
) -> None:
    storage = open_store(retain_bytes=250)
    a = _retained(storage, b"a" * 100)
    b = _retained(storage, b"b" * 100)
    assert storage.stats().retained_bytes == 200
    # another session holds the lock of the oldest retained blob (as a
    # transaction that is leasing it would): trimming must pass it over
    # and delete the next oldest instead, not leave the budget exceeded
    with psycopg.connect(postgres_server.dsn, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (_lock_key(storage.namespace, str(a)),))
        c = _retained(storage, b"c" * 100)
        stats = storage.stats()
        assert stats.retained_bytes <= 250, stats
        assert storage.contains(a) and storage.contains(c)
        assert not storage.contains(b)
    assert not storage.verify()


def test_evictions_count_store_wide(open_store: Any) -> None:
    storage = open_store(max_bytes=250, retain_bytes=250)
    first = _retained(storage, b"1" * 100)
    _retained(storage, b"2" * 100)
    kept = LeaseId.new()
    storage.store_bytes(b"3" * 100, kept)  # evicts the oldest retained blob
    assert not storage.contains(first)
    stats = storage.stats()
    assert (stats.evictions, stats.evicted_bytes) == (1, 100)
    assert storage.operation_counts()["evictions"] == 1
    # kept in the index: another handle on the store sees them
    again = open_store(max_bytes=250, retain_bytes=250)
    assert (again.stats().evictions, again.stats().evicted_bytes) == (1, 100)

