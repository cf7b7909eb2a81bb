"""The conformance suite every backend's tests subclass.

Subclass :class:`BlobStorageTests` in a pytest module and implement
:meth:`~BlobStorageTests.make_storage` (a new, empty store per call),
:meth:`~BlobStorageTests.corrupt_blob` and :meth:`~BlobStorageTests.truncate_blob`::

    class TestMyBackend(BlobStorageTests):
        def make_storage(self, **policies):
            return MyStorage(..., **policies)

        def corrupt_blob(self, storage, content_id): ...
        def truncate_blob(self, storage, content_id): ...

Every test checks one line of SPEC section 2 or 3 and ends by asserting that
``verify()`` finds nothing wrong in every store it opened. Needs pytest.

What a new backend implements
-----------------------------
A backend subclasses :class:`~blobleases.storage.BlobStorage`, whose public
methods validate every argument and then call the backend's abstract
members: ``url`` and ``_store``, ``_store_file``, ``_lease_by_content``,
``_get_data``, ``_get_reader``, ``_advise_lease_dropped``,
``_advise_of_pid``, ``_advise_pid_terminated``, ``_contains``, ``_stat``,
``_iter_content``, ``_iter_leases``, ``_collect``, ``_verify``, ``_stats``,
``_close`` (optionally ``_take_over_lease`` and ``_store_unhashed``); each
one's docstring states its guarantee. The rules behind them (SPEC sections
2 and 3) are written once in :class:`blobleases.engine.Engine`: a backend
that keeps its data in one place under one lock or transaction implements
the verbs of :class:`blobleases.engine.Adapter` (content: ``add_content``,
``delete_content``, ``delete_if_unreferenced``, ``unreferenced_size``,
``total_bytes``; retention: ``retain``, ``retained_bytes``,
``retained_oldest_first``, ``evictable_oldest_first``; leases and holds:
``add_lease``, ``has_lease``, ``remove_lease``, ``remove_hold``,
``remove_leases``, ``remove_holds``, ``owner_leases``, ``owner_holds``,
``expired_batch``; processes:
``owner_pids``, ``is_alive``, ``recorded_start``, ``record_pid``;
counts: ``count_dedup``, ``count_evictions``) and makes each abstract member open its transaction and
call the engine. A store of this process's memory subclasses
:class:`blobleases.adapter_storage.AdapterStorage` instead, which writes
every abstract member, the process and reader-hold tables and the counts
once: it implements only how it keeps content, leases and the LRU
(:class:`~blobleases.memory.MemoryStorage` is the example, and the list).
A backend whose lifecycle runs as bulk statements (SQL, scripts)
implements :class:`blobleases.engine.RoomAdapter` only and calls
:meth:`~blobleases.engine.Engine.settle`,
:meth:`~blobleases.engine.Engine.trim_retained`,
:meth:`~blobleases.engine.Engine.make_room`,
:meth:`~blobleases.engine.Engine.check_read` and the
:class:`~blobleases.engine.ReapSchedule` (as ``DirectoryStorage`` does; it
also implements :class:`blobleases.engine.EndAdapter`, ``remove_lease`` and
``remove_hold``, for :meth:`~blobleases.engine.Engine.end_lease` and
:meth:`~blobleases.engine.Engine.end_hold`).
Then register a url scheme (:func:`blobleases.register_backend`) and
subclass :class:`BlobStorageTests`.
"""

from __future__ import annotations

import gc
import io
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from .content_id import ContentId
from .errors import (
    ContentNotFound,
    IntegrityError,
    LeaseExpired,
    StorageError,
    StoreFull,
)
from .lease import BlobLease, ByValue
from .lease_id import LeaseId
from .manager import BlobManager
from .registry import register_storage, unregister_storage
from .reports import BlobInfo, CollectReport, LeaseInfo, StorageStats, VerifyReport
from .storage import BlobStorage

__all__ = ["BlobStorageTests", "other_process", "wait_until"]


def blob(n: int, seed: int = 0) -> bytes:
    """``n`` deterministic, distinct-per-seed bytes."""
    pattern = (seed.to_bytes(4, "little") + b"blobleases-test-") * (n // 20 + 1)
    return pattern[:n]


@contextmanager
def other_process() -> Iterator[subprocess.Popen[bytes]]:
    """A real, live child process whose pid can own leases; killed at exit."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


@contextmanager
def _registered(storage: BlobStorage) -> Iterator[None]:
    """``storage`` is the registered storage inside the block; whatever was
    registered before is registered again after it."""
    previous = unregister_storage()
    register_storage(storage)
    try:
        yield
    finally:
        unregister_storage()
        if previous is not None:
            register_storage(previous)


def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02
) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _reads_raise_integrity_error(storage: BlobStorage, cid: ContentId, lid: LeaseId) -> None:
    """``get_data`` raises IntegrityError, and so does reading: ``get_reader``
    itself or the first ``read`` of the reader it opens."""
    with pytest.raises(IntegrityError):
        storage.get_data(cid, lid)
    with pytest.raises(IntegrityError):
        storage.get_reader(cid, lid).read()


class BlobStorageTests:
    """Conformance tests for one backend (see the module docstring)."""

    #: Seconds a test waits for a ttl to pass; backends with coarse clocks
    #: may raise it.
    ttl_seconds: float = 1.0

    # -- what a backend's test class supplies ---------------------------------

    def make_storage(self, **policies: Any) -> BlobStorage:
        """A new, empty store with the given policy keywords."""
        raise NotImplementedError

    def corrupt_blob(self, storage: BlobStorage, content_id: ContentId) -> None:
        """Change the stored bytes of ``content_id`` without changing their size."""
        raise NotImplementedError

    def truncate_blob(self, storage: BlobStorage, content_id: ContentId) -> None:
        """Make the stored bytes of ``content_id`` shorter."""
        raise NotImplementedError

    # -- fixtures -------------------------------------------------------------

    @pytest.fixture(autouse=True)
    def _verify_every_store(self) -> Iterator[None]:
        self._opened: list[BlobStorage] = []
        yield
        try:
            for storage in self._opened:
                report = storage.verify()
                assert not report, f"verify() found problems in {storage.url}: {report}"
        finally:
            for storage in self._opened:
                storage.close()

    def open(self, **policies: Any) -> BlobStorage:
        """A new store that the test's teardown verifies and closes."""
        storage = self.make_storage(**policies)
        self._opened.append(storage)
        return storage

    @pytest.fixture
    def storage(self) -> BlobStorage:
        return self.open()

    @pytest.fixture
    def registered(self) -> Iterator[BlobStorage]:
        storage = self.open()
        with _registered(storage):
            yield storage

    # -- helpers ----------------------------------------------------------------

    @staticmethod
    def put(
        storage: BlobStorage, data: bytes, lid: LeaseId | None = None, **kw: Any
    ) -> tuple[ContentId, LeaseId]:
        cid = ContentId.for_bytes(data)
        lid = lid or LeaseId.new()
        storage.store(cid, data, lid, **kw)
        return cid, lid

    @staticmethod
    def lease_count(storage: BlobStorage, cid: ContentId) -> int:
        return sum(1 for info in storage.iter_leases() if info.content_id == cid)

    # == Rule 1: store ==========================================================

    def test_store_then_get_data(self, storage: BlobStorage) -> None:
        data = blob(1000)
        cid, lid = self.put(storage, data)
        assert storage.get_data(cid, lid) == data
        assert storage.contains(cid)
        assert storage.stat(cid).size == 1000

    def test_store_dedups_present_content(self, storage: BlobStorage) -> None:
        data = blob(5000, 1)
        cid, _ = self.put(storage, data)
        hits = storage.stats().dedup_hits
        lid2 = LeaseId.new()
        storage.store(cid, data, lid2)
        stats = storage.stats()
        assert stats.dedup_hits == hits + 1
        assert stats.blobs == 1 and stats.bytes == 5000
        assert storage.stat(cid).lease_count == 2
        assert storage.get_data(cid, lid2) == data

    def test_store_wrong_hash_raises_and_stores_nothing(self, storage: BlobStorage) -> None:
        cid = ContentId.for_bytes(b"the real bytes")
        lid = LeaseId.new()
        with pytest.raises(IntegrityError):
            storage.store(cid, b"other bytes", lid)
        assert not storage.contains(cid)
        assert list(storage.iter_leases()) == []
        assert storage.stats().blobs == 0
        with pytest.raises(LeaseExpired):
            storage.get_data(cid, lid)

    def test_store_again_under_held_lease_is_noop(self, storage: BlobStorage) -> None:
        data = blob(300, 2)
        cid, lid = self.put(storage, data)
        hits = storage.stats().dedup_hits
        storage.store(cid, data, lid)
        assert storage.stat(cid).lease_count == 1
        assert storage.stats().dedup_hits == hits
        storage.advise_lease_dropped(lid, cid)
        assert not storage.contains(cid)

    def test_store_accepts_bytes_like(self, storage: BlobStorage) -> None:
        data = blob(4096, 3)
        for value in (bytearray(data), memoryview(data)):
            cid, _ = self.put(storage, bytes(value))
            lid2 = LeaseId.new()
            storage.store(cid, value, lid2)
            assert storage.get_data(cid, lid2) == data

    def test_store_accepts_numpy_arrays(self, storage: BlobStorage) -> None:
        np = pytest.importorskip("numpy", reason="numpy is not installed (a test extra)")
        array = np.arange(1000, dtype=np.int64)
        cid = ContentId.for_bytes(array)
        lid = LeaseId.new()
        storage.store(cid, array, lid)
        assert storage.get_data(cid, lid) == array.tobytes()

    def test_store_empty_blob(self, storage: BlobStorage) -> None:
        cid, lid = self.put(storage, b"")
        assert str(cid).endswith("b855")
        assert storage.get_data(cid, lid) == b""
        with storage.get_reader(cid, lid) as reader:
            assert reader.size == 0
            assert reader.read() == b""
            assert bytes(reader.getbuffer()) == b""

    def test_store_bytes_hashes_once_and_returns_id(self, storage: BlobStorage) -> None:
        data = blob(777, 4)
        lid = LeaseId.new()
        cid = storage.store_bytes(data, lid)
        assert cid == ContentId.for_bytes(data)
        assert storage.get_data(cid, lid) == data

    def test_store_rejects_wrong_types(self, storage: BlobStorage) -> None:
        cid = ContentId.for_bytes(b"x")
        lid = LeaseId.new()
        with pytest.raises(TypeError, match="content_id"):
            storage.store(str(cid), b"x", lid)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="data"):
            storage.store(cid, "x", lid)
        with pytest.raises(TypeError, match="lease_id"):
            storage.store(cid, b"x", str(lid))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="ttl"):
            storage.store(cid, b"x", lid, ttl=-1)
        with pytest.raises(TypeError, match="detached"):
            storage.store(cid, b"x", lid, detached="yes")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="content_id"):
            storage.lease_by_content(None, lid)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="lease_id"):
            storage.get_data(cid, None)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="repair"):
            storage.verify(repair="yes")  # type: ignore[arg-type]
        assert not storage.contains(cid)
        assert list(storage.iter_leases()) == []

    def test_store_file_from_path_and_file_object(
        self, storage: BlobStorage, tmp_path: Any
    ) -> None:
        data = blob(3 * 1024 * 1024 + 17, 5)
        path = tmp_path / "input.bin"
        path.write_bytes(data)
        lid = LeaseId.new()
        cid = storage.store_file(path, lid)
        assert cid == ContentId.for_bytes(data)
        assert storage.get_data(cid, lid) == data
        lid2 = LeaseId.new()
        with open(path, "rb") as f:
            assert storage.store_file(f, lid2) == cid
        assert storage.stat(cid).lease_count == 2
        assert storage.stats().blobs == 1

    def test_store_file_missing_source_names_it(self, storage: BlobStorage, tmp_path: Any) -> None:
        missing = tmp_path / "no-such-file.bin"
        with pytest.raises(FileNotFoundError, match="no-such-file"):
            storage.store_file(missing, LeaseId.new())
        with pytest.raises(TypeError, match="source"):
            storage.store_file(12, LeaseId.new())  # type: ignore[arg-type]
        assert storage.stats().blobs == 0

    def test_blake3_content(self, storage: BlobStorage) -> None:
        pytest.importorskip("blake3", reason="the blake3 extra is not installed")
        data = blob(10000, 6)
        lid = LeaseId.new()
        cid = storage.store_bytes(data, lid, algorithm="blake3")
        assert cid.algorithm == "blake3" and str(cid).startswith("blake3-")
        assert cid == ContentId.for_bytes(data, "blake3")
        assert storage.get_data(cid, lid) == data
        with pytest.raises(IntegrityError):
            storage.store(ContentId.for_bytes(b"a", "blake3"), b"b", LeaseId.new())

    # == Rule 2: lease_by_content =================================================

    def test_lease_by_content_holds_present_content(self, storage: BlobStorage) -> None:
        data = blob(2000, 7)
        cid, lid = self.put(storage, data)
        lid2 = LeaseId.new()
        storage.lease_by_content(cid, lid2)
        storage.advise_lease_dropped(lid, cid)
        assert storage.get_data(cid, lid2) == data
        storage.lease_by_content(cid, lid2)  # held already: a no-op
        assert storage.stat(cid).lease_count == 1

    def test_lease_by_content_absent_raises_content_not_found(self, storage: BlobStorage) -> None:
        cid = ContentId.for_bytes(b"never stored")
        lid = LeaseId.new()
        with pytest.raises(ContentNotFound) as info:
            storage.lease_by_content(cid, lid)
        assert info.value.content_id == cid
        assert list(storage.iter_leases()) == []

    def test_lease_with_size_and_store_file_with_size(
        self, storage: BlobStorage, tmp_path: Any
    ) -> None:
        data = blob(70001, 71)
        path = tmp_path / "sized.bin"
        path.write_bytes(data)
        lid = LeaseId.new()
        cid, size = storage.store_file_with_size(path, lid)
        assert (cid, size) == (ContentId.for_bytes(data), len(data))
        lid2 = LeaseId.new()
        assert storage.lease_with_size(cid, lid2, ttl=60.0) == len(data)
        assert storage.lease_with_size(cid, lid2) == len(data)  # held already: a no-op
        assert storage.stat(cid).lease_count == 2
        with pytest.raises(ContentNotFound):
            storage.lease_with_size(ContentId.for_bytes(b"absent"), LeaseId.new())
        with pytest.raises(TypeError, match="content_id"):
            storage.lease_with_size(str(cid), lid2)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="detached"):
            storage.lease_with_size(cid, LeaseId.new(), detached=1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="source"):
            storage.store_file_with_size(12, LeaseId.new())  # type: ignore[arg-type]
        assert storage.stat(cid).lease_count == 2

    # == Rule 3: reads need a held lease, never partial or wrong bytes ==============

    def test_get_data_without_lease_raises_lease_expired(self, storage: BlobStorage) -> None:
        cid, _ = self.put(storage, blob(100, 8))
        stranger = LeaseId.new()
        with pytest.raises(LeaseExpired):
            storage.get_data(cid, stranger)
        with pytest.raises(LeaseExpired):
            storage.get_reader(cid, stranger)

    def test_get_data_after_drop_raises_lease_expired(self, storage: BlobStorage) -> None:
        cid, lid = self.put(storage, blob(100, 9))
        storage.advise_lease_dropped(lid, cid)
        with pytest.raises(LeaseExpired):
            storage.get_data(cid, lid)
        with pytest.raises(LeaseExpired):
            storage.get_reader(cid, lid)

    def test_truncated_blob_raises_integrity_error(self, storage: BlobStorage) -> None:
        data = blob(64 * 1024, 10)
        cid, lid = self.put(storage, data)
        self.truncate_blob(storage, cid)
        _reads_raise_integrity_error(storage, cid, lid)
        report = storage.verify()
        assert report and cid in report.corrupted + report.missing
        storage.verify(repair=True)
        with pytest.raises(LeaseExpired):
            storage.get_data(cid, lid)

    def test_verify_reads_rejects_corrupted_bytes(self) -> None:
        storage = self.open(verify_reads=True)
        data = blob(10000, 11)
        cid, lid = self.put(storage, data)
        self.corrupt_blob(storage, cid)
        _reads_raise_integrity_error(storage, cid, lid)
        storage.verify(repair=True)

    # == Rule 4: readers hold content ============================================

    def test_reader_keeps_content_after_lease_dropped(self, storage: BlobStorage) -> None:
        data = blob(50000, 12)
        cid, lid = self.put(storage, data)
        reader = storage.get_reader(cid, lid)
        storage.advise_lease_dropped(lid, cid)
        assert storage.contains(cid)
        storage.collect()
        assert storage.contains(cid)
        assert reader.read() == data
        reader.close()
        assert not storage.contains(cid)
        assert storage.stats().blobs == 0

    def test_reader_garbage_collected_releases_hold(self, storage: BlobStorage) -> None:
        cid, lid = self.put(storage, blob(1000, 13))
        reader = storage.get_reader(cid, lid)
        storage.advise_lease_dropped(lid, cid)
        assert storage.stat(cid).reader_count == 1
        del reader
        gc.collect()
        assert not storage.contains(cid)

    def test_reader_is_a_seekable_binary_file(self, storage: BlobStorage) -> None:
        import io

        data = blob(100_000, 14)
        cid, lid = self.put(storage, data)
        with storage.get_reader(cid, lid) as reader:
            assert isinstance(reader, io.BufferedIOBase)
            assert reader.readable() and reader.seekable() and not reader.writable()
            assert reader.size == len(data)
            assert reader.read(10) == data[:10]
            assert reader.tell() == 10
            assert reader.read1(5) == data[10:15]
            assert reader.peek(4)[:4] == data[15:19]
            assert reader.tell() == 15
            buf = bytearray(100)
            assert reader.readinto(buf) == 100 and bytes(buf) == data[15:115]
            assert reader.seek(-10, io.SEEK_END) == len(data) - 10
            assert reader.read() == data[-10:]
            assert reader.read() == b""
            assert reader.seek(5, io.SEEK_SET) == 5
            assert reader.seek(5, io.SEEK_CUR) == 10
            assert reader.read(3) == data[10:13]
            reader.seek(0)
            assert bytes(reader.getbuffer()) == data
            assert reader.getbuffer().readonly
            with pytest.raises(OSError):  # as a file does (BytesIO raises ValueError)
                reader.seek(-1)
            with pytest.raises(OSError):
                reader.write(b"x")
        assert reader.closed
        with pytest.raises(ValueError):
            reader.read()
        assert storage.stat(cid).reader_count == 0

    def test_reader_counts_in_stat(self, storage: BlobStorage) -> None:
        cid, lid = self.put(storage, blob(10, 15))
        r1 = storage.get_reader(cid, lid)
        r2 = storage.get_reader(cid, lid)
        assert storage.stat(cid).reader_count == 2
        r1.close()
        r1.close()  # closing twice releases once
        assert storage.stat(cid).reader_count == 1
        r2.close()
        assert storage.stat(cid).reader_count == 0

    # == Rule 5: dropping ===========================================================

    def test_drop_ends_only_that_lease(self, storage: BlobStorage) -> None:
        data = blob(100, 16)
        cid, lid1 = self.put(storage, data)
        lid2 = LeaseId.new()
        storage.lease_by_content(cid, lid2)
        other_cid, other_lid = self.put(storage, blob(100, 17))
        storage.advise_lease_dropped(lid1, cid)
        storage.advise_lease_dropped(lid1, cid)  # twice: a no-op
        storage.advise_lease_dropped(LeaseId.new(), cid)  # unknown: a no-op
        storage.advise_lease_dropped(lid2, other_cid)  # lid2 does not hold other_cid
        assert storage.get_data(cid, lid2) == data
        assert storage.get_data(other_cid, other_lid) == blob(100, 17)
        with pytest.raises(LeaseExpired):
            storage.get_data(cid, lid1)

    def test_unreferenced_content_is_deleted_at_once(self, storage: BlobStorage) -> None:
        cid, lid = self.put(storage, blob(2048, 18))
        storage.advise_lease_dropped(lid, cid)
        assert not storage.contains(cid)
        assert cid not in list(storage.iter_content())
        stats = storage.stats()
        assert stats.blobs == 0 and stats.bytes == 0 and stats.leases == 0
        with pytest.raises(ContentNotFound):
            storage.lease_by_content(cid, LeaseId.new())

    def test_same_lease_id_on_two_contents(self, storage: BlobStorage) -> None:
        lid = LeaseId.new()
        a, _ = self.put(storage, blob(10, 19), lid)
        b, _ = self.put(storage, blob(10, 20), lid)
        storage.advise_lease_dropped(lid, a)
        assert not storage.contains(a)
        assert storage.get_data(b, lid) == blob(10, 20)

    # == Rule 6: advise_of_pid / advise_pid_terminated =============================

    def test_advise_pid_terminated_ends_its_leases_only(self, storage: BlobStorage) -> None:
        with other_process() as child:
            theirs = LeaseId.new(pid=child.pid)
            their_detached = LeaseId.new(pid=child.pid)
            cid, _ = self.put(storage, blob(500, 21), theirs)
            storage.lease_by_content(cid, their_detached, detached=True)
            only_theirs, _ = self.put(storage, blob(500, 22), LeaseId.new(pid=child.pid))
            mine = LeaseId.new()
            storage.lease_by_content(cid, mine)
            storage.advise_pid_terminated(child.pid)
            with pytest.raises(LeaseExpired):
                storage.get_data(cid, theirs)
            assert storage.get_data(cid, their_detached) == blob(500, 21)
            assert storage.get_data(cid, mine) == blob(500, 21)
            assert not storage.contains(only_theirs)
            storage.advise_lease_dropped(their_detached, cid)

    def test_advise_pid_terminated_ends_reader_holds(self, storage: BlobStorage) -> None:
        cid, lid = self.put(storage, blob(500, 23))
        reader = storage.get_reader(cid, lid)
        storage.advise_lease_dropped(lid, cid)
        assert storage.contains(cid)
        storage.advise_pid_terminated(os.getpid())
        assert not storage.contains(cid)
        reader.close()

    def test_advise_unknown_or_dead_pid_is_a_noop(self, storage: BlobStorage) -> None:
        cid, lid = self.put(storage, blob(10, 24))
        with other_process() as child:
            storage.advise_of_pid(child.pid)
            storage.advise_pid_terminated(child.pid)  # holds nothing
        storage.advise_of_pid(child.pid)  # dead now
        assert storage.get_data(cid, lid) == blob(10, 24)
        assert storage.stats().leases == 1

    @pytest.mark.parametrize("pid", [0, -1, "12", 1.5, True, None])
    def test_bad_pid_is_a_value_error(self, storage: BlobStorage, pid: Any) -> None:
        with pytest.raises(ValueError, match="pid"):
            storage.advise_of_pid(pid)
        with pytest.raises(ValueError, match="pid"):
            storage.advise_pid_terminated(pid)

    # == Rule 7: liveness needs no call =============================================

    def test_dead_process_leases_reaped_by_collect(self, storage: BlobStorage) -> None:
        with other_process() as child:
            theirs = LeaseId.new(pid=child.pid)
            cid, _ = self.put(storage, blob(4000, 25), theirs)
            shared, _ = self.put(storage, blob(4000, 26), theirs)
            mine = LeaseId.new()
            storage.lease_by_content(shared, mine)
            storage.advise_of_pid(child.pid)
        report = storage.collect()
        assert isinstance(report, CollectReport)
        assert report.leases_reaped >= 2
        assert report.bytes_freed >= 4000
        assert not storage.contains(cid)
        assert storage.get_data(shared, mine) == blob(4000, 26)
        with pytest.raises(LeaseExpired):
            storage.get_data(shared, theirs)

    def test_dead_process_leases_reaped_without_a_call(self) -> None:
        storage = self.open(reap_interval=0.05)
        with other_process() as child:
            theirs = LeaseId.new(pid=child.pid)
            cid, _ = self.put(storage, blob(4000, 27), theirs)
        assert wait_until(lambda: not storage.contains(cid))

    # == Rule 8: ttl and detached ===================================================

    def test_ttl_lease_ends_at_expiry(self, storage: BlobStorage) -> None:
        before = time.time()
        cid, lid = self.put(storage, blob(100, 28), ttl=self.ttl_seconds)
        assert storage.get_data(cid, lid) == blob(100, 28)
        (info,) = storage.iter_leases()
        # expires ttl after the store, however long the store took
        assert info.expires_at is not None
        assert info.expires_at >= before + self.ttl_seconds - 0.001
        time.sleep(self.ttl_seconds + 0.05)
        with pytest.raises(LeaseExpired):
            storage.get_data(cid, lid)
        assert not storage.contains(cid)
        assert list(storage.iter_leases()) == []

    def test_ttl_lease_by_content(self, storage: BlobStorage) -> None:
        cid, lid = self.put(storage, blob(100, 29))
        short = LeaseId.new()
        storage.lease_by_content(cid, short, ttl=self.ttl_seconds)
        time.sleep(self.ttl_seconds + 0.05)
        with pytest.raises(LeaseExpired):
            storage.get_data(cid, short)
        assert storage.get_data(cid, lid) == blob(100, 29)

    def test_detached_lease_outlives_its_process(self, storage: BlobStorage) -> None:
        with other_process() as child:
            detached = LeaseId.new(pid=child.pid)
            cid, _ = self.put(storage, blob(100, 30), detached, detached=True)
            storage.advise_of_pid(child.pid)
        storage.collect()
        stats = storage.stats()
        assert (stats.leases, stats.processes) == (1, 0)  # only live processes count
        storage.advise_pid_terminated(child.pid)
        assert storage.get_data(cid, detached) == blob(100, 30)
        assert [i.detached for i in storage.iter_leases()] == [True]
        storage.advise_lease_dropped(detached, cid)
        assert not storage.contains(cid)

    def test_collect_reports_expired_leases(self, storage: BlobStorage) -> None:
        cid, _ = self.put(storage, blob(100, 32), ttl=self.ttl_seconds)
        time.sleep(self.ttl_seconds + 0.05)
        report = storage.collect()
        assert (report.leases_reaped, report.blobs_deleted) == (1, 1)
        assert not storage.contains(cid)

    def test_detached_ttl_lease_expires(self, storage: BlobStorage) -> None:
        cid, _ = self.put(storage, blob(100, 31), detached=True, ttl=self.ttl_seconds)
        time.sleep(self.ttl_seconds + 0.05)
        storage.collect()
        assert not storage.contains(cid)

    # == Rule 9: concurrency (threads here; processes in backend tests) =============

    def test_threads_never_lose_leased_content(self, storage: BlobStorage) -> None:
        payloads = [blob(2000 + i, 100 + i) for i in range(6)]
        ids = [ContentId.for_bytes(p) for p in payloads]
        anchors = []
        for i in (0, 1):
            lid = LeaseId.new()
            storage.store(ids[i], payloads[i], lid)
            anchors.append((ids[i], lid))
        errors: list[BaseException] = []

        def work(seed: int) -> None:
            import random

            rng = random.Random(seed)
            held: list[tuple[ContentId, LeaseId]] = []
            try:
                for _ in range(150):
                    op = rng.random()
                    k = rng.randrange(len(ids))
                    if op < 0.3:
                        lid = LeaseId.new()
                        storage.store(ids[k], payloads[k], lid)
                        held.append((ids[k], lid))
                    elif op < 0.45:
                        lid = LeaseId.new()
                        try:
                            storage.lease_by_content(ids[k], lid)
                            held.append((ids[k], lid))
                        except ContentNotFound:
                            pass
                    elif op < 0.7 and held:
                        cid, lid = held.pop(rng.randrange(len(held)))
                        storage.advise_lease_dropped(lid, cid)
                    elif op < 0.85 and held:
                        cid, lid = rng.choice(held)
                        with storage.get_reader(cid, lid) as reader:
                            assert ContentId.for_bytes(reader.read()) == cid
                    elif op < 0.9:
                        storage.collect()
                    elif held:
                        cid, lid = rng.choice(held)
                        assert ContentId.for_bytes(storage.get_data(cid, lid)) == cid
                for cid, lid in held:
                    assert ContentId.for_bytes(storage.get_data(cid, lid)) == cid
                    storage.advise_lease_dropped(lid, cid)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for cid, lid in anchors:
            assert ContentId.for_bytes(storage.get_data(cid, lid)) == cid
            storage.advise_lease_dropped(lid, cid)
        storage.collect()
        stats = storage.stats()
        assert (stats.blobs, stats.bytes, stats.leases) == (0, 0, 0)

    # == Policies ===================================================================

    def test_max_bytes_refuse_changes_nothing(self) -> None:
        storage = self.open(max_bytes=10_000)
        a, la = self.put(storage, blob(6000, 40))
        b = ContentId.for_bytes(blob(6000, 41))
        lb = LeaseId.new()
        with pytest.raises(StoreFull):
            storage.store(b, blob(6000, 41), lb)
        assert not storage.contains(b)
        assert storage.get_data(a, la) == blob(6000, 40)
        assert storage.stats().bytes == 6000
        assert storage.stats().leases == 1
        c, lc = self.put(storage, blob(4000, 42))  # exactly fills max_bytes
        assert storage.stats().bytes == 10_000
        with pytest.raises(StoreFull):
            storage.store(ContentId.for_bytes(blob(20_000, 43)), blob(20_000, 43), LeaseId.new())
        assert storage.get_data(c, lc) == blob(4000, 42)

    def test_max_bytes_evict_lru_unreferenced_first(self) -> None:
        storage = self.open(max_bytes=10_000, on_full="evict", retain_bytes=10_000)
        a, la = self.put(storage, blob(3000, 50))
        time.sleep(0.01)
        b, lb = self.put(storage, blob(3000, 51))
        time.sleep(0.01)
        r, lr = self.put(storage, blob(3000, 52))
        storage.advise_lease_dropped(lr, r)  # retained, unreferenced
        assert storage.contains(r)
        time.sleep(0.01)
        storage.get_data(a, la)  # a is now more recent than b
        c, lc = self.put(storage, blob(3000, 53))  # evicts retained r first
        assert not storage.contains(r)
        assert storage.contains(a) and storage.contains(b)
        d, ld = self.put(storage, blob(3000, 54))  # then the LRU leased one: b
        assert not storage.contains(b)
        with pytest.raises(LeaseExpired):
            storage.get_data(b, lb)
        for cid, lid in ((a, la), (c, lc), (d, ld)):
            assert ContentId.for_bytes(storage.get_data(cid, lid)) == cid
        assert storage.stats().bytes <= 10_000

    def test_evict_never_evicts_content_with_a_reader(self) -> None:
        storage = self.open(max_bytes=6000, on_full="evict")
        a, la = self.put(storage, blob(3000, 60))
        b, lb = self.put(storage, blob(3000, 61))
        with storage.get_reader(a, la) as ra, storage.get_reader(b, lb) as rb:
            with pytest.raises(StoreFull):
                storage.store(ContentId.for_bytes(blob(3000, 62)), blob(3000, 62), LeaseId.new())
            assert ra.read() == blob(3000, 60) and rb.read() == blob(3000, 61)
        c, _ = self.put(storage, blob(3000, 62))  # readers closed: a is evicted
        assert not storage.contains(a) and storage.contains(b) and storage.contains(c)

    @pytest.mark.parametrize("on_full", ["evict", "refuse"])
    def test_store_full_evicts_nothing_when_eviction_cannot_make_room(self, on_full: str) -> None:
        # Evictable: retained r (and, with on_full="evict", leased e); never
        # evictable: k and m, leased with an open reader. The new blob cannot
        # fit even after evicting all that may go, so nothing may go.
        storage = self.open(max_bytes=10_000, on_full=on_full, retain_bytes=10_000)
        r, lr = self.put(storage, blob(2000, 55))
        storage.advise_lease_dropped(lr, r)
        e, le = self.put(storage, blob(2000, 56))
        k, lk = self.put(storage, blob(3000, 57))
        m, lm = self.put(storage, blob(3000, 58))
        new = blob(5000, 59)
        with storage.get_reader(k, lk) as rk, storage.get_reader(m, lm) as rm:
            with pytest.raises(StoreFull):
                storage.store(ContentId.for_bytes(new), new, LeaseId.new())
            with pytest.raises(StoreFull):
                storage.store_file(io.BytesIO(new), LeaseId.new())
            assert not storage.contains(ContentId.for_bytes(new))
            for cid in (r, e, k, m):
                assert storage.contains(cid), f"{cid} was evicted by a store that failed"
            assert storage.get_data(e, le) == blob(2000, 56)
            assert rk.read() == blob(3000, 57) and rm.read() == blob(3000, 58)
            stats = storage.stats()
            assert (stats.blobs, stats.bytes, stats.leases) == (4, 10_000, 3)
        lr2 = LeaseId.new()
        storage.lease_by_content(r, lr2)  # retained content is still a hit
        assert storage.get_data(r, lr2) == blob(2000, 55)

    def test_store_full_evicts_nothing_while_a_victim_gains_readers(self) -> None:
        # The new blob fits only if both a and b are evicted (k keeps a
        # reader); another thread keeps opening readers on b. Each store
        # either fits (a and b evicted) or raises StoreFull having evicted
        # nothing: never a evicted and then StoreFull because b gained a
        # reader meanwhile.
        storage = self.open(max_bytes=10_000, on_full="evict")
        k, lk = self.put(storage, blob(3000, 90))
        a_data, b_data, new = blob(3000, 91), blob(3000, 92), blob(5000, 93)
        a, b, n = (ContentId.for_bytes(x) for x in (a_data, b_data, new))
        la, lb = LeaseId.new(), LeaseId.new()
        stop = threading.Event()
        failures: list[BaseException] = []

        def read_b() -> None:
            while not stop.is_set():
                try:
                    with storage.get_reader(b, lb) as reader:
                        reader.read(1)
                except LeaseExpired:
                    pass  # evicted by a store that fit; stored again below
                except BaseException as exc:  # pragma: no cover - reported below
                    failures.append(exc)
                    return

        with storage.get_reader(k, lk):
            thread = threading.Thread(target=read_b, daemon=True)
            thread.start()
            try:
                for _ in range(150):
                    storage.store(a, a_data, la)
                    storage.store(b, b_data, lb)
                    ln = LeaseId.new()
                    try:
                        storage.store(n, new, ln)
                    except StoreFull:
                        assert storage.contains(a), "a store that raised StoreFull evicted"
                        assert storage.get_data(a, la) == a_data
                        assert storage.contains(b) and not storage.contains(n)
                        continue
                    assert not storage.contains(a) and not storage.contains(b)
                    storage.advise_lease_dropped(ln, n)
            finally:
                stop.set()
                thread.join()
        assert not failures, failures
        assert storage.stats().bytes <= 10_000

    def test_retain_bytes_keeps_unreferenced_content(self) -> None:
        storage = self.open(retain_bytes=5000)
        a, la = self.put(storage, blob(2000, 70))
        storage.advise_lease_dropped(la, a)
        assert storage.contains(a)
        lid = LeaseId.new()
        storage.lease_by_content(a, lid)  # a hit
        assert storage.get_data(a, lid) == blob(2000, 70)
        storage.advise_lease_dropped(lid, a)
        hits = storage.stats().dedup_hits
        lid2 = LeaseId.new()
        storage.store(a, blob(2000, 70), lid2)
        assert storage.stats().dedup_hits == hits + 1
        storage.advise_lease_dropped(lid2, a)
        time.sleep(0.01)
        b, lb = self.put(storage, blob(2000, 71))
        storage.advise_lease_dropped(lb, b)
        time.sleep(0.01)
        c, lc = self.put(storage, blob(2000, 72))
        storage.advise_lease_dropped(lc, c)  # 6000 > 5000: the LRU (a) goes
        assert not storage.contains(a)
        assert storage.contains(b) and storage.contains(c)
        big, lbig = self.put(storage, blob(6000, 73))
        storage.advise_lease_dropped(lbig, big)  # larger than retain_bytes
        assert not storage.contains(big)
        storage.collect()
        assert storage.contains(b) and storage.contains(c)

    def test_lock_timeout_is_accepted(self) -> None:
        storage = self.open(lock_timeout=2.5)
        assert storage.policies.lock_timeout == 2.5
        cid, lid = self.put(storage, blob(10, 74))
        assert storage.get_data(cid, lid) == blob(10, 74)

    @pytest.mark.parametrize(
        ("policies", "error", "name"),
        [
            ({"max_bytes": -1}, ValueError, "max_bytes"),
            ({"max_bytes": "10"}, TypeError, "max_bytes"),
            ({"on_full": "drop"}, ValueError, "on_full"),
            ({"retain_bytes": -5}, ValueError, "retain_bytes"),
            ({"reap_interval": -1}, ValueError, "reap_interval"),
            ({"transfer_ttl": 0}, ValueError, "transfer_ttl"),
            ({"durability": "maybe"}, ValueError, "durability"),
            ({"verify_reads": "yes"}, TypeError, "verify_reads"),
            ({"lock_timeout": 0}, ValueError, "lock_timeout must be"),
            ({"lock_timeout": float("inf")}, ValueError, "lock_timeout must be"),
            ({"lock_timeout": "30"}, TypeError, "lock_timeout must be"),
        ],
    )
    def test_bad_policy_names_it(
        self, policies: dict[str, Any], error: type[Exception], name: str
    ) -> None:
        with pytest.raises(error, match=name):
            self.make_storage(**policies)

    # == Introspection, verify, collect, close ========================================

    def test_stat_iter_and_stats(self, storage: BlobStorage) -> None:
        before = time.time()
        a, la = self.put(storage, blob(100, 80))
        b, lb = self.put(storage, blob(200, 81), ttl=60)
        info = storage.stat(a)
        assert isinstance(info, BlobInfo)
        assert (info.content_id, info.size, info.lease_count, info.reader_count) == (a, 100, 1, 0)
        assert before - 1 <= info.created <= time.time() + 1
        assert info.last_access >= info.created - 1
        assert sorted(storage.iter_content()) == sorted([a, b])
        leases = {i.lease_id: i for i in storage.iter_leases()}
        assert set(leases) == {la, lb}
        assert all(isinstance(i, LeaseInfo) for i in leases.values())
        assert leases[la].content_id == a and leases[la].pid == os.getpid()
        assert leases[la].expires_at is None
        expires = leases[lb].expires_at
        assert expires is not None and time.time() + 50 < expires < time.time() + 70
        stats = storage.stats()
        assert isinstance(stats, StorageStats)
        assert (stats.blobs, stats.bytes, stats.leases, stats.processes) == (2, 300, 2, 1)
        with pytest.raises(ContentNotFound):
            storage.stat(ContentId.for_bytes(b"absent"))

    def test_verify_finds_and_repairs_corruption(self, storage: BlobStorage) -> None:
        good, lg = self.put(storage, blob(5000, 90))
        bad, lb = self.put(storage, blob(5000, 91))
        assert not storage.verify()
        self.corrupt_blob(storage, bad)
        report = storage.verify()
        assert isinstance(report, VerifyReport)
        assert report and report.corrupted == [bad]
        assert storage.contains(bad)  # reporting changes nothing
        repaired = storage.verify(repair=True)
        assert repaired.corrupted == [bad] and repaired.repaired
        assert not storage.contains(bad)
        with pytest.raises(LeaseExpired):
            storage.get_data(bad, lb)
        assert storage.get_data(good, lg) == blob(5000, 90)
        assert not storage.verify()

    def test_collect_on_a_clean_store_frees_nothing(self, storage: BlobStorage) -> None:
        cid, lid = self.put(storage, blob(100, 92))
        report = storage.collect()
        assert report.blobs_deleted == 0 and report.bytes_freed == 0
        assert storage.get_data(cid, lid) == blob(100, 92)

    def test_close_and_context_manager(self) -> None:
        storage = self.make_storage()
        with storage as entered:
            assert entered is storage
            cid, lid = self.put(storage, blob(10, 93))
            storage.advise_lease_dropped(lid, cid)
        with pytest.raises(StorageError):
            storage.store(cid, blob(10, 93), LeaseId.new())
        storage.close()  # idempotent

    def test_url_is_text(self, storage: BlobStorage) -> None:
        assert isinstance(storage.url, str) and storage.url

    # == Lease handles on this backend ================================================

    def test_blob_lease_close_and_with_drop_once(self, storage: BlobStorage) -> None:
        manager = BlobManager(storage)
        lease = manager.store(blob(100, 94))
        assert isinstance(lease, BlobLease) and lease.size == 100
        second = manager.get_by_content_id(str(lease.content_id))
        lease.close()
        lease.close()
        assert second.get_data() == blob(100, 94)
        with pytest.raises(LeaseExpired):
            lease.get_data()
        with second:
            pass
        assert not storage.contains(lease.content_id)

    def test_blob_lease_garbage_collected_is_dropped(self, storage: BlobStorage) -> None:
        lease = BlobManager(storage).store(blob(100, 95))
        cid = lease.content_id
        del lease
        gc.collect()
        assert not storage.contains(cid)

    def test_blob_lease_clone_and_reader(self, storage: BlobStorage) -> None:
        lease = BlobManager(storage).store(blob(1000, 96))
        twin = lease.clone()
        assert twin.lease_id != lease.lease_id and twin.content_id == lease.content_id
        lease.close()
        with twin.get_reader() as reader:
            twin.close()
            assert reader.read() == blob(1000, 96)
        assert not storage.contains(lease.content_id)

    def test_get_by_content_id_absent(self, storage: BlobStorage) -> None:
        with pytest.raises(ContentNotFound):
            BlobManager(storage).get_by_content_id(ContentId.for_bytes(b"nope"))

    def test_pickle_round_trip_makes_a_new_lease(self, registered: BlobStorage) -> None:
        lease = BlobManager(registered).store(blob(1000, 97))
        data = pickle.dumps(lease)
        assert blob(1000, 97) not in data
        copy = pickle.loads(data)
        again = pickle.loads(data)  # one pickle may be loaded many times
        assert isinstance(copy, BlobLease)
        assert copy.lease_id != lease.lease_id and again.lease_id != copy.lease_id
        lease.close()
        assert copy.get_data() == blob(1000, 97) == again.get_data()
        copy.close()
        again.close()
        with pytest.raises(LeaseExpired):
            pickle.dumps(lease)

    def test_transfer_ticket_outlives_close_and_is_single_use(self) -> None:
        storage = self.open(transfer_ttl=self.ttl_seconds * 2)
        with _registered(storage):
            lease = BlobManager(storage).store(blob(1000, 98))
            cid = lease.content_id
            ticket = lease.transfer()
            lease.close()
            assert storage.contains(cid)  # the transfer lease holds it
            received = pickle.loads(pickle.dumps(ticket))
            assert isinstance(received, BlobLease)
            assert received.get_data() == blob(1000, 98)
            # loading took the receiver's lease and ended the transfer lease
            assert [i.lease_id for i in storage.iter_leases()] == [received.lease_id]
            received.close()
            assert not storage.contains(cid)  # freed at once, not at transfer_ttl
            gone = ticket.load()  # used, and nobody holds the content: a failing lease
            assert gone.content_id == cid and gone.size == 1000
            for use in (gone.get_data, gone.get_reader, gone.clone, gone.transfer):
                with pytest.raises(LeaseExpired, match="freed"):
                    use()
            with pytest.raises(LeaseExpired):
                pickle.dumps(gone)
            gone.close()  # a no-op

    def test_transfer_ticket_never_loaded_ends_at_its_ttl(self) -> None:
        storage = self.open(transfer_ttl=self.ttl_seconds)
        lease = BlobManager(storage).store(blob(1000, 96))
        ticket = lease.transfer()
        lease.close()
        assert ticket.expires_at is not None
        assert wait_until(lambda: time.time() > ticket.expires_at + 0.05)  # type: ignore[operator]
        storage.collect()
        assert not storage.contains(lease.content_id)
        with _registered(storage):
            stale = pickle.loads(pickle.dumps(ticket))
        with pytest.raises(LeaseExpired, match="expired"):
            stale.get_data()

    def test_take_over_lease(self, storage: BlobStorage) -> None:
        cid, old = self.put(storage, blob(500, 95), ttl=60, detached=True)
        new = LeaseId.new()
        assert storage.take_over_lease(cid, old, new) == 500
        (info,) = storage.iter_leases()
        assert (info.lease_id, info.expires_at, info.detached) == (new, None, False)
        with pytest.raises(LeaseExpired):
            storage.get_data(cid, old)
        # old is gone: a second take-over leases as lease_by_content does
        again = LeaseId.new()
        assert storage.take_over_lease(cid, old, again) == 500
        assert {i.lease_id for i in storage.iter_leases()} == {new, again}
        storage.advise_lease_dropped(new, cid)
        storage.advise_lease_dropped(again, cid)
        assert not storage.contains(cid)
        assert storage.take_over_lease(cid, old, LeaseId.new()) is None
        assert storage.stats().leases == 0
        with pytest.raises(TypeError, match="from_lease_id"):
            storage.take_over_lease(cid, str(old), new)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="to_lease_id"):
            storage.take_over_lease(cid, old, None)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="content_id"):
            storage.take_over_lease(str(cid), old, new)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="to_lease_id"):
            storage.take_over_lease(cid, old, old)

    def test_take_over_of_an_expired_lease_finds_nothing(self, storage: BlobStorage) -> None:
        cid, old = self.put(storage, blob(500, 94), ttl=self.ttl_seconds, detached=True)
        (info,) = storage.iter_leases()
        assert info.expires_at is not None
        expires_at = info.expires_at
        # no other operation meanwhile: the take-over itself meets the expiry
        assert wait_until(lambda: time.time() > expires_at + 0.01, timeout=self.ttl_seconds * 10)
        assert storage.take_over_lease(cid, old, LeaseId.new()) is None
        assert not storage.contains(cid) and storage.stats().leases == 0

    def test_by_value_round_trips_into_another_storage(self, storage: BlobStorage) -> None:
        target = self.open()
        lease = BlobManager(storage).store(blob(2000, 99))
        data = pickle.dumps(ByValue(lease))
        lease.close()
        with _registered(target):
            copy = pickle.loads(data)
        assert copy.storage is target and copy.get_data() == blob(2000, 99)
        copy.close()
        assert not target.contains(copy.content_id)


# == Property-based: random operation sequences against a model ==========================


def storage_state_machine(make_storage: Callable[[], BlobStorage], foreign_pid: int) -> type[Any]:
    """A hypothesis ``RuleBasedStateMachine`` that drives random store / lease /
    drop / read / reader open-close / pid terminate sequences on a fresh
    store from ``make_storage`` and compares every observable with a model.

    ``foreign_pid`` is a live process (not this one) whose pid some leases
    name, so that ``advise_pid_terminated`` has someone to end. Use it as::

        TestMachine = storage_state_machine(factory, child.pid).TestCase
    """
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

    payloads = [blob(n, seed) for seed, n in enumerate((0, 1, 100, 4096, 5000, 70_000))]
    ids = [ContentId.for_bytes(p) for p in payloads]
    by_id = dict(zip(ids, payloads, strict=True))

    class StorageMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.storage = make_storage()
            self.leases: dict[tuple[LeaseId, ContentId], bool] = {}  # -> detached
            self.dropped: list[tuple[LeaseId, ContentId]] = []
            self.readers: list[tuple[ContentId, Any]] = []
            self.hits = 0

        def present(self, cid: ContentId) -> bool:
            return any(k[1] == cid for k in self.leases) or any(c == cid for c, _ in self.readers)

        def teardown(self) -> None:
            for _, reader in self.readers:
                reader.close()
            try:
                assert not self.storage.verify()
            finally:
                self.storage.close()

        @rule(k=st.integers(0, len(ids) - 1), foreign=st.booleans(), detached=st.booleans())
        def store(self, k: int, foreign: bool, detached: bool) -> None:
            lid = LeaseId.new(pid=foreign_pid if foreign else None)
            if self.present(ids[k]):
                self.hits += 1
            self.storage.store(ids[k], payloads[k], lid, detached=detached)
            self.leases[(lid, ids[k])] = detached

        @rule(k=st.integers(0, len(ids) - 1))
        def store_wrong_bytes(self, k: int) -> None:
            wrong = payloads[(k + 1) % len(payloads)]
            lid = LeaseId.new()
            if self.present(ids[k]):
                self.hits += 1  # present content is not checked again: a dedup hit
                self.storage.store(ids[k], wrong, lid)
                self.leases[(lid, ids[k])] = False
            else:
                with pytest.raises(IntegrityError):
                    self.storage.store(ids[k], wrong, lid)

        @precondition(lambda self: bool(self.leases))
        @rule(data=st.data())
        def store_again_under_held_lease(self, data: Any) -> None:
            lid, cid = data.draw(st.sampled_from(list(self.leases)))
            self.storage.store(cid, by_id[cid], lid)

        @rule(k=st.integers(0, len(ids) - 1), foreign=st.booleans())
        def lease_by_content(self, k: int, foreign: bool) -> None:
            lid = LeaseId.new(pid=foreign_pid if foreign else None)
            if self.present(ids[k]):
                self.storage.lease_by_content(ids[k], lid)
                self.leases[(lid, ids[k])] = False
            else:
                with pytest.raises(ContentNotFound):
                    self.storage.lease_by_content(ids[k], lid)

        @precondition(lambda self: bool(self.leases))
        @rule(data=st.data())
        def drop(self, data: Any) -> None:
            key = data.draw(st.sampled_from(list(self.leases)))
            self.storage.advise_lease_dropped(*key)
            del self.leases[key]
            self.dropped.append(key)

        @precondition(lambda self: bool(self.dropped))
        @rule(data=st.data())
        def drop_again_and_read_dropped(self, data: Any) -> None:
            lid, cid = data.draw(st.sampled_from(self.dropped))
            if (lid, cid) in self.leases:
                return
            self.storage.advise_lease_dropped(lid, cid)
            with pytest.raises(LeaseExpired):
                self.storage.get_data(cid, lid)

        @precondition(lambda self: bool(self.leases))
        @rule(data=st.data())
        def get_data(self, data: Any) -> None:
            lid, cid = data.draw(st.sampled_from(list(self.leases)))
            assert self.storage.get_data(cid, lid) == by_id[cid]

        @precondition(lambda self: bool(self.leases))
        @rule(data=st.data())
        def open_reader(self, data: Any) -> None:
            lid, cid = data.draw(st.sampled_from(list(self.leases)))
            self.readers.append((cid, self.storage.get_reader(cid, lid)))

        @precondition(lambda self: bool(self.readers))
        @rule(data=st.data())
        def close_reader(self, data: Any) -> None:
            i = data.draw(st.integers(0, len(self.readers) - 1))
            cid, reader = self.readers.pop(i)
            assert reader.read() == by_id[cid]
            reader.close()

        @rule()
        def terminate_foreign_pid(self) -> None:
            self.storage.advise_pid_terminated(foreign_pid)
            for key, detached in list(self.leases.items()):
                if key[0].pid == foreign_pid and not detached:
                    del self.leases[key]
                    self.dropped.append(key)

        @rule()
        def collect(self) -> None:
            self.storage.collect()

        @invariant()
        def matches_model(self) -> None:
            for cid in ids:
                assert self.storage.contains(cid) == self.present(cid), cid
            present = [c for c in ids if self.present(c)]
            stats = self.storage.stats()
            assert stats.blobs == len(present)
            assert stats.bytes == sum(len(by_id[c]) for c in present)
            assert stats.leases == len(self.leases)
            assert stats.dedup_hits == self.hits
            held = {(i.lease_id, i.content_id) for i in self.storage.iter_leases()}
            assert held == set(self.leases)

    return StorageMachine
