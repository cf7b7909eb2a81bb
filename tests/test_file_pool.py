"""A DirectoryStorage with a file pool (the executor's private stores) writes
new blobs into the files of deleted ones, but never into a file that some
process still has open or mapped, and its pool files are invisible to
stats(), verify() and, once their process is dead, removed by collect()."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobleases import BlobManager, ContentId, DirectoryStorage, LeaseId, file_pool

MiB = 1 << 20


def _shm_or_tmp(tmp_path: Path) -> Path:
    """The store's directory: on /dev/shm (tmpfs, where the pool is used)
    if there is one, else the test's temporary directory."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return Path("/dev/shm", f"test-pool-{uuid.uuid4().hex[:12]}")
    return tmp_path / "store"


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[DirectoryStorage]:
    path = _shm_or_tmp(tmp_path)
    made = DirectoryStorage(path)
    made._use_file_pool(max_files=4, max_bytes=8 * MiB)
    try:
        yield made
    finally:
        made.close()
        shutil.rmtree(path, ignore_errors=True)


def _pool_files(storage: DirectoryStorage) -> list[str]:
    return sorted(n for n in os.listdir(storage.root / "tmp") if file_pool._POOL_NAME.fullmatch(n))


def _data(tag: int, size: int = MiB) -> bytes:
    return bytes([tag % 251]) * size


def _store(storage: DirectoryStorage, data: bytes) -> tuple[ContentId, LeaseId]:
    lid = LeaseId.new()
    return storage.store_bytes(data, lid), lid


def test_a_freed_file_is_written_again(storage: DirectoryStorage) -> None:
    cid, lid = _store(storage, _data(1))
    inode = os.stat(storage.blob_path(cid)).st_ino
    storage.advise_lease_dropped(lid, cid)
    assert not storage.contains(cid)
    assert len(_pool_files(storage)) == 1
    assert storage.stats().bytes == 0  # the pool is not content
    for size in (MiB, MiB // 2, 3 * MiB // 2):  # the same size, smaller, bigger
        data = _data(size, size)
        cid2, lid2 = _store(storage, data)
        assert os.stat(storage.blob_path(cid2)).st_ino == inode
        assert storage.get_data(cid2, lid2) == data
        assert os.stat(storage.blob_path(cid2)).st_size == size
        assert not storage.verify()
        storage.advise_lease_dropped(lid2, cid2)
    assert not storage.verify()


def test_a_file_still_mapped_is_never_written_again(storage: DirectoryStorage) -> None:
    """A view that outlived its hold (here: this process's holds ended by
    advise_pid_terminated while it lives) keeps its bytes."""
    old = _data(7)
    cid, lid = _store(storage, old)
    inode = os.stat(storage.blob_path(cid)).st_ino
    reader = storage.get_reader(cid, lid)
    view = reader.getbuffer()
    storage.advise_pid_terminated(os.getpid())
    assert not storage.contains(cid)
    cid2, lid2 = _store(storage, _data(8))
    assert os.stat(storage.blob_path(cid2)).st_ino != inode
    assert view == old
    assert _pool_files(storage) == []  # the mapped file was unlinked, not kept
    view.release()
    reader.close()
    storage.advise_lease_dropped(lid2, cid2)


def _child_keeps_view(view: memoryview, expected: bytes, go: object) -> None:
    go.wait()  # type: ignore[attr-defined]
    os._exit(0 if view == expected else 3)


def test_a_view_inherited_by_a_forked_child_keeps_its_bytes(storage: DirectoryStorage) -> None:
    """Executor workers are forked: a child's copy of a mapping keeps the
    file open, so the parent's next blob never lands in it."""
    ctx = multiprocessing.get_context("fork")
    old = _data(11)
    manager = BlobManager(storage)
    lease = manager.store(old)
    inode = os.stat(storage.blob_path(lease.content_id)).st_ino
    reader = lease.get_reader()
    view = reader.getbuffer()
    go = ctx.Event()
    child = ctx.Process(target=_child_keeps_view, args=(view, old, go), daemon=True)
    child.start()
    try:
        view.release()
        reader.close()
        lease.close()  # the parent's last hold: the content is freed
        assert not storage.contains(lease.content_id)
        new = manager.store(_data(12))
        new_inode = os.stat(storage.blob_path(new.content_id)).st_ino
    finally:
        go.set()
        child.join(30)
    assert child.exitcode == 0, "the child's inherited view changed"
    assert new_inode != inode
    new.close()


def test_the_pool_stays_within_its_bounds(storage: DirectoryStorage) -> None:
    stored = [_store(storage, _data(i)) for i in range(10)]
    for cid, lid in stored:
        storage.advise_lease_dropped(lid, cid)
    assert len(_pool_files(storage)) == 4  # max_files
    small = [_store(storage, _data(i, 3 * MiB)) for i in range(20, 24)]
    for cid, lid in small:
        storage.advise_lease_dropped(lid, cid)
    sizes = [os.stat(storage.root / "tmp" / n).st_size for n in _pool_files(storage)]
    assert sum(sizes) <= 8 * MiB  # max_bytes
    assert not storage.verify()
    assert storage.stats().blobs == 0


def _pool_then_exit(path: str) -> None:
    storage = DirectoryStorage(path)
    storage._use_file_pool()
    cid, lid = _store(storage, _data(30))
    storage.advise_lease_dropped(lid, cid)
    os._exit(0 if len(_pool_files(storage)) == 1 else 3)


def test_collect_removes_the_pool_files_of_a_dead_process(storage: DirectoryStorage) -> None:
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_pool_then_exit, args=(str(storage.root),))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert len(_pool_files(storage)) == 1
    report = storage.collect()
    assert report.files_removed == 1
    assert _pool_files(storage) == []
    assert not storage.verify()


def test_small_blobs_are_not_pooled(storage: DirectoryStorage) -> None:
    cid, lid = _store(storage, _data(40, file_pool.POOL_MIN - 1))
    storage.advise_lease_dropped(lid, cid)
    assert _pool_files(storage) == []
    assert not (storage.root / "blobs" / cid.algorithm / cid.hex[:2] / cid.hex).exists()
