"""How many index write transactions dumps and loads cost per large
buffer: they are most of the per-task cost of LeaseExecutor after the copy
(each takes the store's writer lock), so the count is pinned here."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobleases import DirectoryStorage, dumps, loads


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[DirectoryStorage]:
    made = DirectoryStorage(tmp_path / "store")
    try:
        yield made
    finally:
        made.close()


class _Writes:
    """Counts the write transactions begun on a handle's index connection."""

    def __init__(self, storage: DirectoryStorage) -> None:
        storage.stats()  # opens this process's connection
        db: sqlite3.Connection = storage._db  # type: ignore[assignment]
        self.count = 0
        db.set_trace_callback(self._seen)

    def _seen(self, sql: str) -> None:
        if sql.strip().upper().startswith("BEGIN IMMEDIATE"):
            self.count += 1


def test_dumps_writes_the_index_once_per_large_buffer(storage: DirectoryStorage) -> None:
    writes = _Writes(storage)
    payload = dumps([b"a" * 100_000, b"b" * 100_000], storage=storage)
    # one store (content row and its transfer lease) per buffer; no lease to
    # take and end around each transfer
    assert writes.count == 2
    assert storage.stats().leases == 2
    loads(payload, storage=storage)


def test_loads_writes_the_index_once_per_blob_and_once_at_the_end(
    storage: DirectoryStorage,
) -> None:
    payload = dumps(b"c" * 100_000, storage=storage)
    writes = _Writes(storage)
    view = loads(payload, storage=storage)
    # the take-over of the transfer lease and the reader's hold, together
    assert writes.count == 1
    assert bytes(view) == b"c" * 100_000
    stats = storage.stats()
    assert (stats.blobs, stats.leases) == (1, 1)
    cid = next(iter(storage.iter_content()))
    assert storage.stat(cid).reader_count == 1
    before = writes.count  # (stats() may write recorded accesses)
    del view
    # the hold and the lease end together, freeing the content
    assert writes.count == before + 1
    assert storage.stats().blobs == 0
    assert storage.stats().leases == 0
