"""The ``storage`` fixture of the BlobReader tests (test_reader_file.py,
test_reader_lines.py): one fresh store per test on every backend that has
its own reader (memory, directory, shm and redis). A test module imports
``storage_fixture``; its tests ask for ``storage``."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobleases import BlobStorage, DirectoryStorage, MemoryStorage
from blobleases.urls import open_storage

BACKENDS = ["memory", "directory", "shm", "redis"]


@pytest.fixture(params=BACKENDS, name="storage")
def storage_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStorage]:
    kind = request.param
    if kind == "memory":
        made: BlobStorage = MemoryStorage()
    elif kind == "directory":
        made = DirectoryStorage(tmp_path / "store")
    elif kind == "shm":
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm on this machine")
        made = open_storage(f"shm://test-reader-{uuid.uuid4().hex[:12]}")
    else:
        from blobleases.redis_storage import RedisStorage

        server = request.getfixturevalue("redis_server")
        # A small chunk size: reads and lines cross chunks.
        made = RedisStorage(
            server.url, namespace=f"t-{uuid.uuid4().hex[:12]}", chunk_size=16 * 1024
        )
    try:
        yield made
    finally:
        root = getattr(made, "root", None)
        made.close()
        if kind == "shm" and root is not None:
            shutil.rmtree(root, ignore_errors=True)
