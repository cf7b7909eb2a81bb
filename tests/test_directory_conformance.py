"""DirectoryStorage (a path, and ``temporary()``) passes the conformance suite."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from blobleases import BlobStorage, ContentId
from blobleases.directory import DirectoryStorage
from blobleases.testing import BlobStorageTests


def _path_of(storage: BlobStorage, content_id: ContentId) -> Path:
    assert isinstance(storage, DirectoryStorage)
    return storage.blob_path(content_id)


class _FileFaults:
    def corrupt_blob(self, storage: BlobStorage, content_id: ContentId) -> None:
        path = _path_of(storage, content_id)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        with open(path, "r+b") as f:
            f.write(data)

    def truncate_blob(self, storage: BlobStorage, content_id: ContentId) -> None:
        path = _path_of(storage, content_id)
        os.truncate(path, path.stat().st_size // 2)


class TestDirectoryStorage(_FileFaults, BlobStorageTests):
    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.count = 0

    def make_storage(self, **policies: Any) -> BlobStorage:
        self.count += 1
        return DirectoryStorage(self.tmp_path / f"store{self.count}", **policies)


class TestTemporaryDirectoryStorage(_FileFaults, BlobStorageTests):
    def make_storage(self, **policies: Any) -> BlobStorage:
        return DirectoryStorage.temporary(**policies)
