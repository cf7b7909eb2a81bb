"""``operation_counts`` counts every BlobLeaseError a storage method raised
(``errors:<Kind>``, what ``blobleases_errors_total`` exports), the methods
called now and then (stat, why) as well as the blob operations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from blobleases import BlobStorage, ContentId, ContentNotFound, DirectoryStorage, MemoryStorage


@pytest.fixture(params=["memory", "directory"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStorage]:
    made: BlobStorage = (
        MemoryStorage() if request.param == "memory" else DirectoryStorage(tmp_path / "store")
    )
    with made:
        yield made


def test_stat_and_why_of_absent_content_are_counted(storage: BlobStorage) -> None:
    absent = ContentId.for_bytes(b"never stored")
    with pytest.raises(ContentNotFound):
        storage.stat(absent)
    with pytest.raises(ContentNotFound):
        storage.why(absent)
    assert storage.operation_counts().get("errors:ContentNotFound") == 2
