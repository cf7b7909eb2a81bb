"""Lease handles, the manager and the registry (MemoryStorage, one process
and forked children)."""

from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys

import pytest

import blobleases
from blobleases import (
    BlobLease,
    BlobManager,
    ByValue,
    ContentNotFound,
    LeaseExpired,
    LeaseTicket,
    MemoryStorage,
    StorageAlreadyInitialized,
    StorageNotInitialized,
    get_storage,
    register_storage,
)


def test_public_names_are_importable() -> None:
    for name in blobleases.__all__:
        assert getattr(blobleases, name) is not None, name


def test_registry_rules() -> None:
    with pytest.raises(StorageNotInitialized):
        get_storage()
    with pytest.raises(StorageNotInitialized):
        blobleases.store(b"x")
    with pytest.raises(StorageNotInitialized):
        BlobManager().store(b"x")
    storage = MemoryStorage()
    register_storage(storage)
    register_storage(storage)  # the same object again: a no-op
    assert get_storage() is storage
    with pytest.raises(StorageAlreadyInitialized):
        register_storage(MemoryStorage())
    with pytest.raises(TypeError, match="storage"):
        BlobManager("memory://")  # type: ignore[arg-type]


def test_module_level_store_and_get() -> None:
    storage = MemoryStorage()
    manager = BlobManager()  # made before registration: looks storage up per call
    register_storage(storage)
    lease = blobleases.store(b"payload")
    assert manager.get_by_content_id(lease.content_id).get_data() == b"payload"
    again = blobleases.get_by_content_id(str(lease.content_id))
    assert again.size == 7 and again.get_data() == b"payload"
    with pytest.raises(ContentNotFound):
        blobleases.get_by_content_id("sha256-" + "0" * 64)
    with pytest.raises(blobleases.InvalidContentId):
        blobleases.get_by_content_id("nonsense")


def test_store_file_through_manager(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "in.bin"
    path.write_bytes(b"z" * 100_000)
    lease = BlobManager(MemoryStorage()).store_file(path)
    assert lease.size == 100_000 and lease.get_data() == b"z" * 100_000


def test_detached_lease_survives_garbage_collection() -> None:
    storage = MemoryStorage()
    lease = BlobManager(storage).store(b"keep me", detached=True)
    cid, lid = lease.content_id, lease.lease_id
    del lease
    gc.collect()
    assert storage.get_data(cid, lid) == b"keep me"
    assert BlobManager(storage).get_by_content_id(cid).get_data() == b"keep me"


def test_ttl_through_manager() -> None:
    storage = MemoryStorage()
    lease = BlobManager(storage).store(b"short", ttl=60)
    (info,) = storage.iter_leases()
    assert info.lease_id == lease.lease_id and info.expires_at is not None
    with pytest.raises(ValueError, match="ttl"):
        BlobManager(storage).store(b"x", ttl=0)


def test_closed_lease_operations_raise_lease_expired() -> None:
    lease = BlobManager(MemoryStorage()).store(b"abc")
    lease.close()
    for op in (lease.get_data, lease.get_reader, lease.clone, lease.transfer):
        with pytest.raises(LeaseExpired):
            op()
    with pytest.raises(LeaseExpired):
        pickle.dumps(lease)
    with pytest.raises(LeaseExpired):
        pickle.dumps(ByValue(lease))


def test_memory_lease_pickles_into_the_registered_storage() -> None:
    storage = MemoryStorage()
    register_storage(storage)
    lease = blobleases.store(b"abc" * 100)
    ticket = lease.transfer()
    assert isinstance(ticket, LeaseTicket) and ticket.url is None
    assert len(pickle.dumps(ticket)) < 300
    lease.close()
    loaded = pickle.loads(pickle.dumps(ticket))
    assert isinstance(loaded, BlobLease) and loaded.storage is storage
    assert loaded.get_data() == b"abc" * 100
    assert ticket.load().get_data() == b"abc" * 100


def test_lease_of_evicted_content_reports_lease_expired() -> None:
    storage = MemoryStorage(max_bytes=10, on_full="evict")
    lease = BlobManager(storage).store(b"0123456789")
    BlobManager(storage).store(b"abcdefghij")
    with pytest.raises(LeaseExpired):
        lease.get_data()
    with pytest.raises(LeaseExpired):
        lease.clone()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX only")
def test_forked_child_inherits_registration_and_does_not_end_parent_leases() -> None:
    storage = MemoryStorage()
    register_storage(storage)
    lease = blobleases.store(b"parent bytes")
    reader = lease.get_reader()
    pid = os.fork()
    if pid == 0:  # the child: use the inherited storage, then drop our copies
        code = 0
        try:
            child_lease = blobleases.store(b"child bytes")
            assert child_lease.get_data() == b"child bytes"
            assert lease.get_data() == b"parent bytes"
            lease.close()
            reader.close()
            del lease
            gc.collect()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert lease.get_data() == b"parent bytes"
    assert storage.stat(lease.content_id).reader_count == 1
    reader.close()


def test_lease_ended_at_interpreter_exit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    script = tmp_path / "exit.py"
    script.write_text(
        "import atexit, blobleases\n"
        "s = blobleases.MemoryStorage()\n"
        "atexit.register(lambda: print('leases', s.stats().leases))\n"
        "lease = blobleases.BlobManager(s).store(b'x')\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "leases 0"


def test_open_storage_memory_and_bad_urls() -> None:
    storage = blobleases.open_storage("memory://", max_bytes=100)
    assert isinstance(storage, MemoryStorage) and storage.policies.max_bytes == 100
    with pytest.raises(ValueError, match="scheme"):
        blobleases.open_storage("ftp://x")
    with pytest.raises(ValueError, match="memory"):
        blobleases.open_storage("memory://x")
    with pytest.raises(TypeError, match="url"):
        blobleases.open_storage(None)  # type: ignore[arg-type]
