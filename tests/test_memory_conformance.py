"""MemoryStorage passes the conformance suite."""

from __future__ import annotations

from typing import Any

from blobleases import BlobStorage, ContentId, MemoryStorage
from blobleases.testing import BlobStorageTests


class TestMemoryStorage(BlobStorageTests):
    def make_storage(self, **policies: Any) -> BlobStorage:
        return MemoryStorage(**policies)

    def corrupt_blob(self, storage: BlobStorage, content_id: ContentId) -> None:
        assert isinstance(storage, MemoryStorage)
        data = bytearray(storage._blobs[content_id].data)
        data[len(data) // 2] ^= 0xFF
        storage._corrupt_for_tests(content_id, bytes(data))

    def truncate_blob(self, storage: BlobStorage, content_id: ContentId) -> None:
        assert isinstance(storage, MemoryStorage)
        data = storage._blobs[content_id].data
        storage._corrupt_for_tests(content_id, data[: len(data) // 2])
