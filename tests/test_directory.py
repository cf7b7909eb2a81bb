"""DirectoryStorage: bad input and faults, security, fork safety, urls and roots.

Real files and real SQLite; faults are made on disk with ``blob_path``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import platformdirs
import psutil
import pytest

from blobleases import (
    BlobManager,
    ContentId,
    ContentNotFound,
    IntegrityError,
    LeaseExpired,
    LeaseId,
    StorageError,
    open_storage,
    register_storage,
)
from blobleases.directory import DirectoryStorage, default_root
from blobleases.testing import blob


def put(storage: DirectoryStorage, data: bytes) -> tuple[ContentId, LeaseId]:
    lid = LeaseId.new()
    return storage.store_bytes(data, lid), lid


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tmp_files(storage: DirectoryStorage) -> list[str]:
    return os.listdir(storage.root / "tmp")


@pytest.fixture
def store(tmp_path: Path) -> DirectoryStorage:
    storage = DirectoryStorage(tmp_path / "store")
    yield storage
    storage.close()


# == layout and permissions ===========================================================


def test_layout_and_modes(store: DirectoryStorage) -> None:
    cid, _ = put(store, blob(1000))
    path = store.blob_path(cid)
    assert path == store.root / "blobs" / "sha256" / cid.hex[:2] / cid.hex
    assert path.read_bytes() == blob(1000)
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((store.root / "index.sqlite3").stat().st_mode) == 0o600
    assert store.url == "file://" + str(store.root)
    assert tmp_files(store) == []


def test_blake3_blob_path(store: DirectoryStorage) -> None:
    pytest.importorskip("blake3")
    lid = LeaseId.new()
    cid = store.store_bytes(b"blake", lid, algorithm="blake3")
    assert store.blob_path(cid).parent.parent.name == "blake3"
    assert store.blob_path(cid).read_bytes() == b"blake"


def test_bad_path_arguments(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="path"):
        DirectoryStorage(12)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="path"):
        DirectoryStorage(b"/tmp/x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="path"):
        DirectoryStorage("")
    with pytest.raises(ValueError, match="max_bytes"):
        DirectoryStorage(tmp_path / "s", max_bytes=-1)
    with pytest.raises(TypeError, match="content_id"):
        DirectoryStorage(tmp_path / "s").blob_path("sha256-00")  # type: ignore[arg-type]


def test_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "afile"
    path.write_bytes(b"keep me")
    with pytest.raises(StorageError, match="not a directory"):
        DirectoryStorage(path)
    assert path.read_bytes() == b"keep me"


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_root_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    root = tmp_path / "open"
    root.mkdir()
    (root / "precious").write_bytes(b"x")
    root.chmod(mode)
    with pytest.raises(StorageError, match="writable by group or others"):
        DirectoryStorage(root)
    assert (root / "precious").read_bytes() == b"x"
    assert sorted(os.listdir(root)) == ["precious"]


def test_root_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        root = tmp_path / "theirs"
        root.mkdir(mode=0o700)
        os.chown(root, 65534, 65534)
    else:
        root = Path("/")  # owned by root, not by this user
    with pytest.raises(StorageError, match="owned by uid"):
        DirectoryStorage(root)


_READ_ONLY_CHILD = r"""
import json, sys
from blobleases import ContentId, ContentNotFound, LeaseId, StorageError
from blobleases.directory import DirectoryStorage
out = {}
storage = DirectoryStorage(sys.argv[1])
cid = ContentId.parse(sys.argv[2])
out["read_only"] = storage.read_only
out["contains"] = storage.contains(cid)
out["listed"] = [str(c) for c in storage.iter_content()]
out["leases"] = len(list(storage.iter_leases()))
out["blobs"] = storage.stats().blobs
lid = LeaseId.new()
storage.lease_by_content(cid, lid)
out["data"] = storage.get_data(cid, lid).hex()
with storage.get_reader(cid, lid) as reader:
    out["reader"] = bytes(reader.getbuffer()[:4]).hex()
storage.advise_lease_dropped(lid, cid)
try:
    storage.lease_by_content(ContentId.for_bytes(b"absent"), lid)
except ContentNotFound:
    out["absent"] = "ContentNotFound"
out["verify"] = bool(storage.verify())
for name, call in [
    ("store", lambda: storage.store_bytes(b"new bytes", LeaseId.new())),
    ("collect", storage.collect),
    ("repair", lambda: storage.verify(repair=True)),
]:
    try:
        call()
    except StorageError as exc:
        out[name] = str(exc)
storage.close()
print(json.dumps(out))
"""


def _run_read_only(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``_READ_ONLY_CHILD`` with ``root`` read-only: as root (who ignores
    permission bits) on a read-only bind mount in a private mount
    namespace, else with the root's mode 0500."""
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("needs unshare to make a read-only mount as root")
        script = (
            '{ mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1"; } || exit 77; '
            f'exec {sys.executable} -c "$2" "$1" "$3"'
        )
        result = subprocess.run(
            ["unshare", "-m", "sh", "-c", script, "sh", str(root), _READ_ONLY_CHILD, *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode == 77 or result.stderr.startswith("unshare:"):
            pytest.skip(f"cannot make a read-only mount here: {result.stderr.strip()}")
        return result
    root.chmod(0o500)
    try:
        return run_python(_READ_ONLY_CHILD, str(root), *args)
    finally:
        root.chmod(0o700)


@pytest.mark.parametrize("writer_open", [False, True], ids=["closed", "open-elsewhere"])
def test_read_only_store_opens_read_only_and_changes_nothing(
    tmp_path: Path, writer_open: bool
) -> None:
    """A store this process cannot write is listed, read and verified
    (its index opened read-only, whether or not a writer has it open
    elsewhere); every change is refused naming the store as read-only."""
    root = tmp_path / "ro"
    data = blob(5000, 1)
    with DirectoryStorage(root, durability="safe") as storage:
        cid, _ = put(storage, data)
        storage.lease_by_content(cid, LeaseId.new(), detached=True)
    writer = DirectoryStorage(root) if writer_open else None
    try:
        before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        result = _run_read_only(root, str(cid))
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
        assert out["read_only"] is True
        assert out["contains"] is True and out["listed"] == [str(cid)]
        assert out["leases"] == 2 and out["blobs"] == 1  # put's and the detached one
        assert bytes.fromhex(out["data"]) == data and bytes.fromhex(out["reader"]) == data[:4]
        assert out["absent"] == "ContentNotFound"
        assert out["verify"] is False
        for name in ("store", "collect", "repair"):
            assert "read-only" in out[name] and str(root) in out[name], out
        assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before
    finally:
        if writer is not None:
            writer.close()
    with DirectoryStorage(root) as storage:
        assert storage.contains(cid)
        assert not storage.read_only
        assert not storage.verify()


# == which directories become a store ========================================================


def _listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.lstat().st_mode) for p in root.rglob("*"))


def test_a_non_empty_directory_that_is_not_a_store_is_refused_untouched(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir(mode=0o700)
    (root / "notes.txt").write_text("mine")
    (root / "etc").mkdir(mode=0o700)
    before = _listing(root)
    for create in (True, False):
        with pytest.raises(StorageError, match="not empty") as info:
            DirectoryStorage(root, create=create)
        assert str(root) in str(info.value)
        assert _listing(root) == before
    with pytest.raises(StorageError, match="not empty"):
        open_storage(f"file://{root}")
    assert _listing(root) == before


def test_a_store_is_created_only_in_a_missing_or_empty_directory(tmp_path: Path) -> None:
    missing = tmp_path / "a" / "b"
    with pytest.raises(StorageError, match="no blobleases store") as info:
        DirectoryStorage(missing, create=False)
    assert str(missing) in str(info.value)
    with pytest.raises(StorageError, match="no blobleases store"):
        open_storage(str(missing), create=False)
    assert list(tmp_path.iterdir()) == []
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    with pytest.raises(StorageError, match="no blobleases store"):
        DirectoryStorage(empty, create=False)
    assert list(empty.iterdir()) == []
    for root in (missing, empty):
        with DirectoryStorage(root) as storage:
            cid, lid = put(storage, b"x" * 100)
        with DirectoryStorage(root, create=False) as storage:
            assert storage.get_data(cid, lid) == b"x" * 100
    with pytest.raises(TypeError, match="create"):
        DirectoryStorage(empty, create=1)  # type: ignore[arg-type]


def test_a_refused_open_creates_nothing(tmp_path: Path) -> None:
    """Every check comes before anything is created: a store whose tmp/ is
    group-writable (or is a symlink) does not get back the blobs/ it lost,
    and a foreign format marker is refused."""
    root = tmp_path / "store"
    with DirectoryStorage(root) as storage:
        put(storage, b"y" * 100)
    shutil.rmtree(root / "blobs")
    (root / "tmp").chmod(0o770)
    before = _listing(root)
    with pytest.raises(StorageError, match="tmp"):
        DirectoryStorage(root)
    assert _listing(root) == before
    (root / "tmp").chmod(0o700)
    (root / "tmp").rename(root / "tmp.real")
    (root / "tmp").symlink_to(root / "tmp.real")
    before = _listing(root)
    with pytest.raises(StorageError, match="tmp"):
        DirectoryStorage(root)
    assert _listing(root) == before
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    (other / "format").write_text("some other program's format\n")
    before = _listing(other)
    with pytest.raises(StorageError, match="format"):
        DirectoryStorage(other)
    assert _listing(other) == before


def test_a_refused_root_gets_no_blobs_directory(tmp_path: Path) -> None:
    """The command line once created /blobs before refusing /: a directory
    owned by this user, not group-writable, full of other things."""
    root = tmp_path / "like-root"
    root.mkdir(mode=0o755)
    for name in ("bin", "etc", "tmp"):
        (root / name).mkdir(mode=0o755)
    (root / "tmp").chmod(0o1777)
    before = _listing(root)
    with pytest.raises(StorageError):
        open_storage(f"file://{root}")
    assert _listing(root) == before


# == symlinks ================================================================================


def test_symlink_in_place_of_a_blob_is_never_followed(tmp_path: Path) -> None:
    with DirectoryStorage(tmp_path / "s") as storage:
        data = blob(4000, 2)
        cid, lid = put(storage, data)
        other, other_lid = put(storage, blob(4000, 3))
        outside = tmp_path / "outside.bin"
        outside.write_bytes(data)  # even the right bytes are not read through a link
        path = storage.blob_path(cid)
        path.unlink()
        path.symlink_to(outside)
        with pytest.raises(IntegrityError, match="symlink"):
            storage.get_data(cid, lid)
        with pytest.raises(IntegrityError, match="symlink"):
            storage.get_reader(cid, lid)
        report = storage.verify()
        assert report.corrupted == [cid] and not report.missing and not report.orphaned
        storage.verify(repair=True)
        assert not path.is_symlink() and not path.exists()
        assert outside.read_bytes() == data  # the link's target is untouched
        with pytest.raises(LeaseExpired):
            storage.get_data(cid, lid)
        assert storage.get_data(other, other_lid) == blob(4000, 3)
        assert not storage.verify()


def test_symlinked_directories_inside_the_root_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with DirectoryStorage(root) as storage:
        cid, _ = put(storage, blob(100, 4))
        storage.lease_by_content(cid, LeaseId.new(), detached=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    shutil.rmtree(root / "tmp")
    (root / "tmp").symlink_to(elsewhere)
    with pytest.raises(StorageError, match="symlink"):
        DirectoryStorage(root)
    (root / "tmp").unlink()
    # a shard directory replaced by a link: storing into it is refused
    (root / "tmp").mkdir(mode=0o700)
    data = blob(100, 5)
    target = ContentId.for_bytes(data)
    shard = root / "blobs" / "sha256" / target.hex[:2]
    assert target.hex[:2] != cid.hex[:2]
    shard.rmdir()  # an empty shard directory, made in advance
    shard.symlink_to(elsewhere)
    with DirectoryStorage(root) as storage:
        with pytest.raises(StorageError, match="symlink"):
            storage.store(target, data, LeaseId.new())
        assert not storage.contains(target)
        assert storage.contains(cid)
        assert tmp_files(storage) == []
    assert os.listdir(elsewhere) == []


# == corrupted, truncated, missing blobs =========================================================


def test_corrupted_blob_of_same_size(tmp_path: Path) -> None:
    with DirectoryStorage(tmp_path / "s") as storage:
        data = blob(10_000, 6)
        cid, lid = put(storage, data)
        keep, keep_lid = put(storage, blob(10_000, 7))
        path = storage.blob_path(cid)
        bad = bytearray(data)
        bad[0] ^= 1
        path.write_bytes(bytes(bad))
        assert storage.get_data(cid, lid) == bytes(bad)  # size-only checks by default
        assert storage.verify().corrupted == [cid]
        assert storage.verify(repair=True).repaired
        with pytest.raises(LeaseExpired):
            storage.get_data(cid, lid)
        assert not path.exists()
        assert storage.get_data(keep, keep_lid) == blob(10_000, 7)
    with DirectoryStorage(tmp_path / "v", verify_reads=True) as storage:
        cid, lid = put(storage, data)
        storage.blob_path(cid).write_bytes(bytes(bad))
        with pytest.raises(IntegrityError, match="hash"):
            storage.get_data(cid, lid)
        with pytest.raises(IntegrityError, match="hash"):
            storage.get_reader(cid, lid)
        assert storage.stats().readers == 0  # the failed reader left no hold


def test_truncated_blob_never_gives_short_bytes(store: DirectoryStorage) -> None:
    data = blob(100_000, 8)
    cid, lid = put(store, data)
    os.truncate(store.blob_path(cid), 1000)
    with pytest.raises(IntegrityError, match="1000 bytes"):
        store.get_data(cid, lid)
    with pytest.raises(IntegrityError):
        store.get_reader(cid, lid)
    assert store.stats().readers == 0
    assert store.verify().corrupted == [cid]


def test_missing_blob_file(store: DirectoryStorage) -> None:
    cid, lid = put(store, blob(3000, 9))
    keep, keep_lid = put(store, blob(3000, 10))
    store.blob_path(cid).unlink()
    with pytest.raises(IntegrityError, match="missing"):
        store.get_data(cid, lid)
    report = store.verify()
    assert report.missing == [cid] and not report.corrupted
    collected = store.collect()
    assert collected.rows_removed == 1
    assert not store.contains(cid)
    with pytest.raises(LeaseExpired):
        store.get_data(cid, lid)
    assert store.get_data(keep, keep_lid) == blob(3000, 10)
    assert not store.verify()


def test_orphaned_files_reported_and_collected(store: DirectoryStorage) -> None:
    cid, lid = put(store, blob(100, 11))
    orphan_id = ContentId.for_bytes(b"orphan")
    orphan = store.blob_path(orphan_id)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"orphan")
    junk = store.blob_path(cid).parent / "not-a-blob"
    junk.write_bytes(b"junk")
    dead_temp = store.root / "tmp" / f"999999999-1-{'0' * 16}.tmp"
    dead_temp.write_bytes(b"half")
    report = store.verify()
    assert sorted(report.orphaned) == sorted(map(str, (orphan, junk, dead_temp)))
    assert orphan.exists()  # reporting changes nothing
    assert store.collect().files_removed == 3
    assert not orphan.exists() and not junk.exists() and not dead_temp.exists()
    assert store.get_data(cid, lid) == blob(100, 11)
    assert not store.verify()


def test_temp_file_of_a_live_writer_is_left_alone(store: DirectoryStorage) -> None:
    live = store.root / "tmp" / store._temp_name()
    live.write_bytes(b"being written")
    assert not store.verify()
    store.collect()
    assert live.exists()
    live.unlink()


# == deleted index ================================================================================


def test_deleted_index_is_refused_then_rebuilt(tmp_path: Path) -> None:
    root = tmp_path / "s"
    data = blob(20_000, 12)
    with DirectoryStorage(root) as storage:
        cid, _ = put(storage, data)
        bad, _ = put(storage, blob(500, 13))
    for name in ("index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm"):
        (root / name).unlink(missing_ok=True)
    with pytest.raises(StorageError, match="missing") as info:
        DirectoryStorage(root)
    assert "rebuild_index" in str(info.value)
    assert not (root / "index.sqlite3").exists()  # refusing created nothing
    (root / "blobs" / "sha256" / bad.hex[:2] / bad.hex).write_bytes(b"x" * 500)
    with DirectoryStorage.rebuild_index(root) as storage:
        assert storage.contains(cid) and not storage.contains(bad)
        assert not (root / "blobs" / "sha256" / bad.hex[:2] / bad.hex).exists()
        lid = LeaseId.new()
        storage.lease_by_content(cid, lid)
        assert storage.get_data(cid, lid) == data
        storage.collect()  # unreferenced rebuilt content beyond retain_bytes goes
        assert storage.contains(cid)
        assert storage.stats().blobs == 1
        assert not storage.verify()
    with DirectoryStorage(root) as storage:
        assert storage.contains(cid)


# == failures leave nothing half-done ==================================================================


def test_failed_stores_leave_nothing(store: DirectoryStorage, tmp_path: Path) -> None:
    cid = ContentId.for_bytes(b"right")
    with pytest.raises(IntegrityError):
        store.store(cid, b"wrong", LeaseId.new())

    class Broken:
        def __init__(self) -> None:
            self.calls = 0

        def read(self, size: int = -1) -> bytes:
            raise AssertionError("readinto is used when present")

        def readinto(self, buf: memoryview) -> int:
            self.calls += 1
            if self.calls > 2:
                raise OSError(5, "Input/output error")
            buf[:1000] = b"a" * 1000
            return 1000

    with pytest.raises(StorageError, match="Input/output error") as info:
        store.store_file(Broken(), LeaseId.new())  # type: ignore[arg-type]
    assert isinstance(info.value.__cause__, OSError)
    (tmp_path / "text.txt").write_text("some text")
    with open(tmp_path / "text.txt") as text, pytest.raises(TypeError, match="binary"):
        store.store_file(text, LeaseId.new())  # type: ignore[arg-type]
    assert tmp_files(store) == []
    assert store.stats().blobs == 0 and list(store.iter_leases()) == []
    assert [p for p in (store.root / "blobs").rglob("*") if not p.is_dir()] == []


def test_store_full_with_refuse_changes_no_file(tmp_path: Path) -> None:
    with DirectoryStorage(tmp_path / "s", max_bytes=5000) as storage:
        cid, lid = put(storage, blob(4000, 14))
        from blobleases import StoreFull

        with pytest.raises(StoreFull):
            put(storage, blob(4000, 15))
        assert tmp_files(storage) == []
        assert not storage.blob_path(ContentId.for_bytes(blob(4000, 15))).exists()
        assert storage.get_data(cid, lid) == blob(4000, 14)
        assert not storage.verify()


_FULL_DISK_CHILD = """
import os, sys
from blobleases import ContentId, LeaseId, StorageError
from blobleases.directory import DirectoryStorage
root = sys.argv[1]
with DirectoryStorage(root) as storage:
    small = os.urandom(200_000)
    lid = LeaseId.new()
    cid = storage.store_bytes(small, lid)
    try:
        storage.store_bytes(os.urandom(4_000_000), LeaseId.new())
    except StorageError as exc:
        print("refused:", exc, "| cause:", type(exc.__cause__).__name__)
    else:
        print("stored?!")
    print("tmp:", os.listdir(os.path.join(root, "tmp")))
    print("small ok:", storage.get_data(cid, lid) == small)
    print("blobs:", storage.stats().blobs)
    print("verify:", bool(storage.verify()))
"""


def test_store_into_a_full_filesystem(tmp_path: Path) -> None:
    """A real full filesystem: a 1 MiB tmpfs mounted in a private mount
    namespace (needs unshare and mount rights, else skipped)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare to mount a small tmpfs")
    mount = tmp_path / "small"
    mount.mkdir(mode=0o700)
    script = (
        f"mount -t tmpfs -o size=1m,mode=0700 tmpfs {mount} && "
        f"exec {sys.executable} -c '{_FULL_DISK_CHILD}' {mount}/store"
    )
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0 and "refused" not in result.stdout:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()[-300:]}")
    out = result.stdout
    assert "refused:" in out and "No space left on device" in out, out + result.stderr
    assert "cause: OSError" in out
    assert "tmp: []" in out
    assert "small ok: True" in out and "blobs: 1" in out and "verify: False" in out


# == closing ============================================================================================


def test_operations_after_close_raise_storage_error(tmp_path: Path) -> None:
    storage = DirectoryStorage(tmp_path / "s")
    cid, lid = put(storage, blob(10, 16))
    storage.close()
    storage.close()
    for call in (
        lambda: storage.get_data(cid, lid),
        lambda: storage.lease_by_content(cid, LeaseId.new()),
        lambda: storage.advise_lease_dropped(lid, cid),
        lambda: storage.contains(cid),
        lambda: storage.stats(),
        lambda: storage.collect(),
        lambda: storage.verify(),
        lambda: put(storage, b"more"),
    ):
        with pytest.raises(StorageError, match="closed"):
            call()


def test_reader_outlives_close_of_its_lease_and_getbuffer_view(store: DirectoryStorage) -> None:
    data = blob(200_000, 17)
    cid, lid = put(store, data)
    reader = store.get_reader(cid, lid)
    view = reader.getbuffer()
    store.advise_lease_dropped(lid, cid)
    reader.close()  # the user still holds a view of the mapping: it keeps the hold
    assert store.contains(cid) and store.stat(cid).reader_count == 1
    assert bytes(view[:100]) == data[:100] and len(view) == len(data)
    del view
    gc.collect()
    assert not store.contains(cid)


def test_durability_safe_round_trip(tmp_path: Path) -> None:
    with DirectoryStorage(tmp_path / "s", durability="safe") as storage:
        cid, lid = put(storage, blob(50_000, 18))
        mode = storage._conn().execute("PRAGMA synchronous").fetchone()[0]
        assert mode == 2  # FULL
        assert storage.get_data(cid, lid) == blob(50_000, 18)
    with DirectoryStorage(tmp_path / "f") as storage:
        assert storage._conn().execute("PRAGMA synchronous").fetchone()[0] == 0  # OFF


def test_index_is_wal(store: DirectoryStorage) -> None:
    db = sqlite3.connect(store.root / "index.sqlite3")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


# == fork safety =========================================================================================


def _fork_and_wait(child: object) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            signal.alarm(30)  # a deadlocked child fails instead of hanging
            code = child()  # type: ignore[operator]
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_fork_child_uses_its_own_connection(store: DirectoryStorage) -> None:
    data = blob(30_000, 19)
    cid, lid = put(store, data)
    parent_db = store._conn()

    def child() -> int:
        mine = LeaseId.new()
        store.lease_by_content(cid, mine)
        ok = store.get_data(cid, mine) == data
        ok = ok and store._conn() is not parent_db
        new, new_lid = put(store, b"from the child")
        with store.get_reader(new, new_lid) as reader:
            ok = ok and reader.read() == b"from the child"
        store.advise_lease_dropped(mine, cid)
        store.lease_by_content(new, LeaseId.new(), detached=True)
        return 0 if ok else 3

    assert _fork_and_wait(child) == 0
    assert store._conn() is parent_db
    assert store.get_data(cid, lid) == data
    assert store.contains(ContentId.for_bytes(b"from the child"))
    assert not store.verify()


def test_fork_while_another_thread_holds_the_lock(store: DirectoryStorage) -> None:
    cid, lid = put(store, blob(1000, 20))
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            other = LeaseId.new()
            store.lease_by_content(cid, other)
            store.advise_lease_dropped(other, cid)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        codes = []
        for _ in range(5):

            def child() -> int:
                mine = LeaseId.new()
                store.lease_by_content(cid, mine)
                return 0 if store.get_data(cid, mine) == blob(1000, 20) else 3

            codes.append(_fork_and_wait(child))
    finally:
        stop.set()
        thread.join()
    assert codes == [0] * 5
    store.collect()  # the children's leases are reaped: they are dead
    assert [i.lease_id for i in store.iter_leases()] == [lid]


def test_child_keeps_writing_after_the_parent_closes(tmp_path: Path) -> None:
    """The child's index writes must not go to a WAL the parent deletes when
    it closes what it thinks is the last connection."""
    storage = DirectoryStorage(tmp_path / "s")
    cid, _ = put(storage, b"parent")
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()

    def child() -> int:
        os.close(go_w)
        storage.contains(cid)  # the child connects before the parent closes
        os.write(ready_w, b"r")
        os.read(go_r, 1)
        for i in range(20):
            storage.store_bytes(b"child %d" % i, LeaseId.new(), detached=True)
        return 0

    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = child()
        finally:
            os._exit(code)
    os.close(go_r)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"r"
    os.close(ready_r)
    storage.close()
    os.write(go_w, b"x")
    os.close(go_w)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with DirectoryStorage(tmp_path / "s") as again:
        assert all(again.contains(ContentId.for_bytes(b"child %d" % i)) for i in range(20))
        assert not again.verify()


def test_lease_inherited_by_forked_child_is_not_ended_by_it(store: DirectoryStorage) -> None:
    register_storage(store)
    lease = BlobManager(store).store(blob(500, 21))

    def child() -> int:
        lease.close()
        gc.collect()
        return 0

    assert _fork_and_wait(child) == 0
    assert lease.get_data() == blob(500, 21)
    lease.close()
    assert not store.contains(lease.content_id)


# == urls, roots, temporary, shared memory =====================================================================

_REOPEN_CHILD = """
import sys, hashlib
from blobleases import ContentId, LeaseId, open_storage
storage = open_storage(sys.argv[1])
cid = ContentId.parse(sys.argv[2])
lid = LeaseId.new()
storage.lease_by_content(cid, lid)
print(type(storage).__name__, storage.url, hashlib.sha256(storage.get_data(cid, lid)).hexdigest())
storage.advise_lease_dropped(lid, cid)
storage.close()
"""


def _reopened_elsewhere(url: str, cid: ContentId) -> list[str]:
    result = run_python(_REOPEN_CHILD, url, str(cid))
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_open_storage_path_and_file_url(tmp_path: Path) -> None:
    root = tmp_path / "with space%and percent"
    by_path = open_storage(str(root))
    assert isinstance(by_path, DirectoryStorage) and by_path.root == root
    cid, _ = put(by_path, blob(100, 22))
    by_url = open_storage(by_path.url)
    assert isinstance(by_url, DirectoryStorage) and by_url.root == root
    assert by_url.contains(cid)
    assert _reopened_elsewhere(by_path.url, cid) == [
        "DirectoryStorage",
        by_path.url,
        hashlib.sha256(blob(100, 22)).hexdigest(),
    ]
    by_url.close()
    by_path.close()


def test_temporary_store_is_private_and_removed_on_close() -> None:
    storage = open_storage("temp://")
    assert isinstance(storage, DirectoryStorage)
    root = storage.root
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert storage.url == "file://" + str(root)
    cid, _ = put(storage, blob(100, 23))
    assert _reopened_elsewhere(storage.url, cid)[0] == "DirectoryStorage"
    storage.close()
    assert not root.exists()


def test_temporary_store_removed_when_garbage_collected() -> None:
    storage = DirectoryStorage.temporary()
    root = storage.root
    del storage
    gc.collect()
    assert not root.exists()


def test_shared_memory_store() -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    name = f"test-{uuid.uuid4().hex[:12]}"
    storage = open_storage(f"shm://{name}")
    try:
        assert isinstance(storage, DirectoryStorage)
        assert storage.url == f"shm://{name}"
        assert storage.root == Path(f"/dev/shm/blobleases-{os.geteuid()}/{name}")
        assert stat.S_IMODE(storage.root.parent.stat().st_mode) == 0o700
        cid, _ = put(storage, blob(1000, 24))
        assert _reopened_elsewhere(storage.url, cid) == [
            "DirectoryStorage",
            f"shm://{name}",
            hashlib.sha256(blob(1000, 24)).hexdigest(),
        ]
        with pytest.raises(ValueError, match="name"):
            DirectoryStorage.shared_memory("../escape")
        with pytest.raises(ValueError):
            open_storage("shm://a/b")
    finally:
        root = storage.root
        storage.close()
        shutil.rmtree(root, ignore_errors=True)


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BLOBLEASES_STORE", str(tmp_path / "env-store"))
    assert default_root() == tmp_path / "env-store"
    monkeypatch.delenv("BLOBLEASES_STORE")
    assert default_root() == Path(platformdirs.user_cache_dir("blobleases"))


def test_two_handles_in_one_process_share_the_store(tmp_path: Path) -> None:
    a = DirectoryStorage(tmp_path / "s")
    b = DirectoryStorage(tmp_path / "s")
    try:
        cid, lid = put(a, blob(2000, 25))
        other = LeaseId.new()
        b.lease_by_content(cid, other)
        a.advise_lease_dropped(lid, cid)
        assert b.get_data(cid, other) == blob(2000, 25)
        assert b.stats().dedup_hits == 0
        b.store(cid, blob(2000, 25), LeaseId.new())
        assert a.stats().dedup_hits == 1
    finally:
        a.close()
        b.close()


# == the store/delete race, forced ==================================================================


def test_unlink_after_delete_spares_a_file_a_racing_store_recreated(tmp_path: Path) -> None:
    """Force the interleaving: A's drop commits the row's deletion; before A
    unlinks the file, B stores the same content again (no row: B writes and
    renames its own file and adds a row). A must then leave the file alone."""
    a = DirectoryStorage(tmp_path / "s")
    b = DirectoryStorage(tmp_path / "s")
    data = blob(10_000, 30)
    cid, lid = put(a, data)
    b_lid = LeaseId.new()
    original = a._unlink_doomed

    def store_in_between(tx: Any, epoch: int) -> None:
        assert not b.contains(cid)  # A's deletion has committed
        b.store(cid, data, b_lid)  # B finds no row and writes the file again
        original(tx, epoch)

    a._unlink_doomed = store_in_between  # type: ignore[method-assign]
    try:
        a.advise_lease_dropped(lid, cid)
    finally:
        del a._unlink_doomed
    assert b.get_data(cid, b_lid) == data
    assert a.blob_path(cid).read_bytes() == data
    assert b.stats().dedup_hits == 0
    assert not a.verify()
    a.close()
    b.close()


@pytest.mark.parametrize("retain", [0, 10_000])
def test_storing_content_whose_only_lease_expired(tmp_path: Path, retain: int) -> None:
    """No operation ran between the expiry and the store: the store finds a
    row whose leases all expired, ends them, then stores (or, when retention
    kept the content, counts a dedup hit), as if the expiry had been seen."""
    with DirectoryStorage(tmp_path / "s", retain_bytes=retain) as storage:
        data = blob(1000, 31)
        cid = ContentId.for_bytes(data)
        storage.store(cid, data, LeaseId.new(), ttl=0.2)
        time.sleep(0.3)
        lid = LeaseId.new()
        storage.store(cid, data, lid)
        assert storage.get_data(cid, lid) == data
        assert storage.stats().dedup_hits == (1 if retain else 0)
        assert [i.lease_id for i in storage.iter_leases()] == [lid]
        assert not storage.verify()


# == pid reuse ===================================================================================


def test_leases_of_an_earlier_process_with_a_reused_pid_are_reaped(tmp_path: Path) -> None:
    """A lease recorded for this pid by an earlier process (another start
    time, another owner token whose lock file it left behind unlocked) is
    reaped although the pid is alive; this process's own lease on the same
    pid stays. The earlier process is simulated by rewriting the owner and
    start time recorded in the index."""
    with DirectoryStorage(tmp_path / "s", reap_interval=3600) as storage:
        old_cid, old_lid = put(storage, blob(100, 40))
        mine_cid, mine_lid = put(storage, blob(100, 41))
        earlier = "e" * 32
        (storage.root / "owners" / earlier).write_text(f"pid={os.getpid()}\n")
        db = storage._conn()
        db.execute(
            "INSERT INTO owners(owner, pid, start, scope) "
            "SELECT ?, pid, start - 1000, scope FROM owners",
            (earlier,),
        )
        db.execute(
            "UPDATE leases SET start = start - 1000, owner = ? WHERE lid = ?",
            (earlier, str(old_lid)),
        )
        report = storage.collect()
        assert report.leases_reaped == 1 and report.processes_reaped == 1
        assert not storage.contains(old_cid)
        with pytest.raises(LeaseExpired):
            storage.get_data(old_cid, old_lid)
        assert storage.get_data(mine_cid, mine_lid) == blob(100, 41)


def test_advise_of_pid_ends_leases_of_the_previous_holder_of_the_pid(tmp_path: Path) -> None:
    with DirectoryStorage(tmp_path / "s", reap_interval=3600) as storage:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            theirs = LeaseId.new(pid=child.pid)
            cid, _ = put(storage, blob(100, 42))
            storage.lease_by_content(cid, theirs)
            db = storage._conn()
            db.execute("UPDATE leases SET start = start - 1000 WHERE lid = ?", (str(theirs),))
            storage.advise_of_pid(child.pid)  # records the live process: the old lease ends
            with pytest.raises(LeaseExpired):
                storage.get_data(cid, theirs)
            fresh = LeaseId.new(pid=child.pid)
            storage.lease_by_content(cid, fresh)
            storage.collect()
            assert storage.get_data(cid, fresh) == blob(100, 42)  # the live process's lease
        finally:
            child.kill()
            child.wait()


# -- the owners table of the reap ---------------------------------------------------


def _owner_rows(path: Path) -> list[tuple[int, float]]:
    db = sqlite3.connect(path / "index.sqlite3")
    try:
        return sorted(db.execute("SELECT pid, start FROM owners").fetchall())
    finally:
        db.close()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_owners_lists_every_owner_of_a_lease_or_hold(tmp_path: Path) -> None:
    """Triggers keep one owners row per (pid, start) of non-detached leases
    and holds; a reap that finds the process dead removes its row."""
    root = tmp_path / "s"
    with DirectoryStorage(root) as storage:
        data = blob(3000, 41)
        cid, holder = put(storage, data)
        storage.lease_by_content(cid, LeaseId.new(), detached=True)
        dead = _dead_pid()
        storage.lease_by_content(cid, LeaseId.new(pid=dead))  # start 0: dead already
        with storage.get_reader(cid, holder) as reader:
            assert reader.read(10) == data[:10]
            me = (os.getpid(), storage._mystart)
            assert _owner_rows(root) == sorted([me, (dead, 0.0)])
        assert storage.collect().leases_reaped == 1
        assert _owner_rows(root) == [me]
        assert not storage.verify()


# The index schema of blobleases before owner locks (version 1), as it created it.
_SCHEMA_V1 = """
CREATE TABLE leases(
    cid TEXT NOT NULL, lid TEXT NOT NULL, pid INTEGER NOT NULL, start REAL NOT NULL,
    expires_at REAL, detached INTEGER NOT NULL, PRIMARY KEY (cid, lid)
) WITHOUT ROWID;
CREATE INDEX leases_expiry ON leases(expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE holds(id INTEGER PRIMARY KEY, cid TEXT NOT NULL, pid INTEGER NOT NULL,
    start REAL NOT NULL);
CREATE INDEX holds_cid ON holds(cid);
CREATE TABLE processes(pid INTEGER PRIMARY KEY, start REAL NOT NULL, seen REAL NOT NULL);
CREATE TRIGGER leases_unretain AFTER INSERT ON leases BEGIN
    UPDATE content SET retained = NULL WHERE cid = NEW.cid AND retained IS NOT NULL;
END;
"""
_OWNERS_V1 = """
CREATE TABLE owners(pid INTEGER NOT NULL, start REAL NOT NULL, PRIMARY KEY (pid, start))
    WITHOUT ROWID;
CREATE TRIGGER leases_owner_insert AFTER INSERT ON leases
WHEN NEW.detached = 0 BEGIN
    INSERT OR IGNORE INTO owners(pid, start) VALUES (NEW.pid, NEW.start);
END;
CREATE TRIGGER leases_owner_update AFTER UPDATE OF pid, start, detached ON leases
WHEN NEW.detached = 0 BEGIN
    INSERT OR IGNORE INTO owners(pid, start) VALUES (NEW.pid, NEW.start);
END;
CREATE TRIGGER holds_owner_insert AFTER INSERT ON holds BEGIN
    INSERT OR IGNORE INTO owners(pid, start) VALUES (NEW.pid, NEW.start);
END;
"""


@pytest.mark.parametrize("had_owners", [True, False], ids=["owners-table", "no-owners-table"])
def test_a_store_of_schema_version_1_is_migrated_and_still_reaps(
    tmp_path: Path, had_owners: bool
) -> None:
    """A store made by an earlier version (schema version 1: pid and start
    time per row, with or without its owners table) opens, migrated in one
    transaction: its rows become pid owners of this pid namespace, so a dead
    process's lease and reader hold are reaped, a live process's lease stays
    until that process is killed, and a detached lease stays."""
    root = tmp_path / "s"
    data = blob(2000, 40)
    with DirectoryStorage(root) as storage:
        cid = storage.store_bytes(data, LeaseId.new(), detached=True)
    dead = _dead_pid()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        child_start = psutil.Process(child.pid).create_time()
        dead_lid, live_lid, detached_lid = (
            LeaseId.new(pid=dead),
            LeaseId.new(pid=child.pid),
            LeaseId.new(),
        )
        db = sqlite3.connect(root / "index.sqlite3")
        db.executescript(
            "DROP TABLE leases; DROP TABLE holds; DROP TABLE processes; DROP TABLE owners;"
            + _SCHEMA_V1
            + (_OWNERS_V1 if had_owners else "")
            + "PRAGMA user_version=1;"
        )
        key = str(cid)
        db.executemany(
            "INSERT INTO leases(cid, lid, pid, start, expires_at, detached) "
            "VALUES (?, ?, ?, ?, NULL, ?)",
            [
                (key, str(dead_lid), dead, 0.0, 0),
                (key, str(live_lid), child.pid, child_start, 0),
                (key, str(detached_lid), os.getpid(), 0.0, 1),
            ],
        )
        db.execute("INSERT INTO holds(cid, pid, start) VALUES (?, ?, 0.0)", (key, dead))
        db.execute("INSERT INTO processes VALUES (?, ?, ?)", (child.pid, child_start, 0.0))
        db.commit()
        db.close()
        (root / "tmp" / f"{dead}-1-{'0' * 16}.tmp").write_bytes(b"half")  # a dead v1 writer's
        with DirectoryStorage(root, reap_interval=3600) as storage:
            db = storage._conn()
            assert db.execute("PRAGMA user_version").fetchone()[0] == 2
            owners = dict(db.execute("SELECT pid, owner FROM owners").fetchall())
            assert sorted(owners) == sorted([dead, child.pid])
            assert all(owner.startswith(f"pid:{pid}:") for pid, owner in owners.items())
            report = storage.collect()
            assert (report.leases_reaped, report.readers_reaped) == (1, 1)
            assert report.files_removed == 1
            assert storage.get_data(cid, live_lid) == data
            child.kill()
            child.wait()
            report = storage.collect()
            assert report.leases_reaped == 1 and report.processes_reaped == 1
            assert storage.get_data(cid, detached_lid) == data
            assert [i.lease_id for i in storage.iter_leases()] == [detached_lid]
            storage.advise_lease_dropped(detached_lid, cid)
            assert not storage.contains(cid)
            assert not storage.verify()
    finally:
        child.kill()
        child.wait()


# == file descriptors, and directories removed behind a handle's back ===========================


_FD_CHILD = r"""
import json, os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
from blobleases import LeaseId
from blobleases.content_id import ALGORITHMS
from blobleases.directory import DirectoryStorage
root = sys.argv[1]
handles = [DirectoryStorage(root), DirectoryStorage(root)]
algorithms = [a for a in ("sha256", "blake3") if a in ALGORITHMS]
errors, counts, stored = [], [], []
for i in range(450):
    for alg in algorithms:
        storage = handles[i % 2]
        lid = LeaseId.new()
        try:
            cid = storage.store_bytes(b"%d %s" % (i, alg.encode()), lid, algorithm=alg)
            stored.append((cid, lid))
            assert handles[(i + 1) % 2].contains(cid)
        except Exception as exc:
            errors.append(repr(exc))
    if i % 50 == 49:
        counts.append(len(os.listdir("/proc/self/fd")))
for n, (cid, lid) in enumerate(stored):
    try:
        handles[n % 2].get_data(cid, lid)
    except Exception as exc:
        errors.append(repr(exc))
counts.append(len(os.listdir("/proc/self/fd")))
print(json.dumps({"errors": errors[:5], "n_errors": len(errors), "counts": counts,
                  "stored": len(stored), "algorithms": algorithms}))
"""


def test_descriptors_stay_bounded_under_a_small_limit(tmp_path: Path) -> None:
    """Two handles of one store, 450 blobs of each algorithm, under
    RLIMIT_NOFILE 64 in a child: no store fails, and the open descriptors
    stop growing (a handle keeps a bounded set, whatever the number of blobs)."""
    result = run_python(_FD_CHILD, str(tmp_path / "store"), timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    if "blake3" not in out["algorithms"]:
        print("blake3 is not installed: sha256 only")
    assert out["n_errors"] == 0, out["errors"]
    assert out["stored"] == 450 * len(out["algorithms"])
    counts = out["counts"]
    assert max(counts) < 64
    assert max(counts[1:]) <= counts[0] + 2, counts  # no growth after the first 50


_REMOVED_CHILD = r"""
import sys
from blobleases import LeaseId
from blobleases.directory import DirectoryStorage
storage = DirectoryStorage(sys.argv[1])
lid = LeaseId.new()
cid = storage.store_bytes(b"stored by the other process after the rm", lid)
print(cid, lid, flush=True)
sys.stdin.readline()  # stay alive (its lease with it) until told
print(storage.get_data(cid, lid).decode(), flush=True)
storage.close()
"""


@pytest.mark.parametrize("removed", ["blobs", "blobs/sha256", "tmp"])
def test_a_removed_directory_never_costs_another_process_its_lease(
    tmp_path: Path, removed: str
) -> None:
    """``rm -rf`` of a directory under a live handle H1 (its cached
    descriptors now name removed directories): H1 keeps storing (the tree
    is re-created), and its collect() keeps the row and live lease of a
    process that stored meanwhile (it looks the path up before it decides a
    file is gone)."""
    root = tmp_path / "store"
    h1 = DirectoryStorage(root)
    try:
        old_cid, old_lid = put(h1, b"stored before the rm" * 50)
        h1.get_data(old_cid, old_lid)
        shutil.rmtree(root / removed)
        other = subprocess.Popen(
            [sys.executable, "-c", _REMOVED_CHILD, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert other.stdout is not None and other.stdin is not None
            line = other.stdout.readline().split()
            assert len(line) == 2, line
            cid, lid = ContentId.parse(line[0]), LeaseId.parse(line[1])
            new_cid, new_lid = put(h1, b"stored by H1 after the rm" * 50)
            assert h1.get_data(new_cid, new_lid) == b"stored by H1 after the rm" * 50
            assert h1.get_data(cid, lid) == b"stored by the other process after the rm"
            report = h1.verify()
            # only the file that went with the directory is missing
            assert report.missing == ([] if removed == "tmp" else [old_cid]), report
            assert not report.corrupted and not report.orphaned
            assert h1.collect().rows_removed == len(report.missing)
            assert h1.contains(cid) and h1.contains(new_cid)
            assert any(info.lease_id == lid for info in h1.iter_leases())
            other.stdin.write("\n")
            other.stdin.flush()
            assert other.stdout.readline().strip() == "stored by the other process after the rm"
            assert other.wait(timeout=60) == 0
        finally:
            if other.poll() is None:
                other.kill()
                other.wait()
        if removed == "tmp":
            assert h1.get_data(old_cid, old_lid) == b"stored before the rm" * 50
        assert not h1.verify()
    finally:
        h1.close()


# == a corrupted index ======================================================================


def _public_calls(storage: DirectoryStorage, cid: ContentId, lid: LeaseId) -> dict[str, str]:
    """Every public method once: what each gave ("ok" or the error's type).
    A raw sqlite3 error fails the test; a StorageError must name the index."""
    calls: dict[str, Any] = {
        "get_data": lambda: storage.get_data(cid, lid),
        "get_reader": lambda: storage.get_reader(cid, lid).close(),
        "contains": lambda: storage.contains(cid),
        "stat": lambda: storage.stat(cid),
        "iter_content": lambda: list(storage.iter_content()),
        "iter_leases": lambda: list(storage.iter_leases()),
        "stats": storage.stats,
        "lease_by_content": lambda: storage.lease_by_content(cid, LeaseId.new()),
        "store_bytes": lambda: storage.store_bytes(os.urandom(64), LeaseId.new()),
        "advise_lease_dropped": lambda: storage.advise_lease_dropped(LeaseId.new(), cid),
        "advise_pid_terminated": lambda: storage.advise_pid_terminated(2**22 + 1),
        "collect": storage.collect,
    }
    outcomes: dict[str, str] = {}
    for name, call in calls.items():
        try:
            call()
        except sqlite3.Error as exc:
            pytest.fail(f"{name} raised a raw {type(exc).__name__}: {exc}")
        except StorageError as exc:
            assert "index.sqlite3" in str(exc), (name, exc)
            assert isinstance(exc.__cause__, (sqlite3.Error, ValueError)), (name, exc)
            outcomes[name] = "StorageError"
        except (ContentNotFound, LeaseExpired, IntegrityError) as exc:
            outcomes[name] = type(exc).__name__
        else:
            outcomes[name] = "ok"
    return outcomes


def _store_some(root: Path) -> list[tuple[ContentId, LeaseId]]:
    with DirectoryStorage(root) as storage:
        held = [put(storage, b"blob %d " % i * 40) for i in range(20)]
        for cid, _ in held:
            storage.lease_by_content(cid, LeaseId.new(), detached=True)
    return held


def _check_reported(root: Path, cid: ContentId, lid: LeaseId) -> None:
    try:
        storage = DirectoryStorage(root)
    except StorageError as exc:
        # damage this deep may refuse the open itself: named, never raw
        assert "index" in str(exc) and isinstance(exc.__cause__, sqlite3.Error), exc
        return
    with storage:
        report = storage.verify()
        assert report and report.index_errors, report
        assert all("index.sqlite3" in line for line in report.index_errors)
        assert storage.verify(repair=True).index_errors  # nothing repaired through it
        outcomes = _public_calls(storage, cid, lid)
        assert "StorageError" in outcomes.values(), outcomes
    proc = subprocess.run(
        [sys.executable, "-m", "blobleases", "--store", str(root), "verify"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "index" in proc.stdout and "Traceback" not in proc.stderr


def test_text_that_is_not_utf8_in_the_index_is_reported(tmp_path: Path) -> None:
    """Bytes of one content id in index.sqlite3 overwritten (same length, so
    SQLite's own page checks pass): verify() reports the index, and no
    method raises a raw sqlite3 error."""
    root = tmp_path / "store"
    held = _store_some(root)
    cid, _lid = held[3]
    index = root / "index.sqlite3"
    raw = index.read_bytes()
    hexid = cid.hex.encode()
    assert raw.count(hexid) >= 2  # its content row and its lease rows
    index.write_bytes(raw.replace(hexid, b"\xff" * len(hexid)))
    _check_reported(root, *held[0])


def test_garbage_pages_in_the_index_are_reported(tmp_path: Path) -> None:
    root = tmp_path / "store"
    held = _store_some(root)
    index = root / "index.sqlite3"
    raw = bytearray(index.read_bytes())
    page = int.from_bytes(raw[16:18], "big")
    at = raw.index(b"lease:pid=") // page * page
    assert at > 0 and b"last_reap" not in raw[at : at + page]
    raw[at : at + page] = os.urandom(page)
    index.write_bytes(bytes(raw))
    _check_reported(root, *held[0])


_WAL_WRITER = r"""
import sys
from blobleases import LeaseId
from blobleases.directory import DirectoryStorage
storage = DirectoryStorage(sys.argv[1])
for i in range(20):
    cid = storage.store_bytes(b"wal blob %d " % i * 40, LeaseId.new(), detached=True)
print(cid, flush=True)
sys.stdin.readline()
"""


def test_garbage_in_the_wal_is_reported(tmp_path: Path) -> None:
    """A live process keeps the store open (its changes still in
    index.sqlite3-wal); the WAL's lease rows overwritten with bytes that
    are not UTF-8: verify() reports the index (it reported clean, while
    collect() failed forever) and no method raises a raw sqlite3 error."""
    root = tmp_path / "store"
    DirectoryStorage(root).close()
    writer = subprocess.Popen(
        [sys.executable, "-c", _WAL_WRITER, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdin is not None
        cid = ContentId.parse(writer.stdout.readline().strip())
        wal = root / "index.sqlite3-wal"
        raw = wal.read_bytes()
        assert b"lease:pid=" in raw
        damaged = re.sub(rb"lease:pid=[0-9]+,[0-9a-f-]{36}", lambda m: b"\xff" * len(m[0]), raw)
        assert damaged != raw
        wal.write_bytes(damaged)
        _check_reported(root, cid, LeaseId.new())
    finally:
        writer.kill()
        writer.wait()


def test_loading_a_lease_of_a_removed_store_creates_no_store(tmp_path: Path) -> None:
    """A ticket names a store that exists: a process loading one for a
    store removed since gets an error, never a new empty store there."""
    root = tmp_path / "gone"
    storage = DirectoryStorage(root)
    lease = BlobManager(storage).store(b"x" * 100)
    ticket = lease.transfer()
    lease.close()
    storage.close()
    shutil.rmtree(root)
    code = """
    import pickle, sys
    try:
        pickle.loads(sys.stdin.buffer.read()).get_data()
    except Exception as exc:
        print(type(exc).__name__, exc)
    else:
        print("loaded")
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        input=pickle.dumps(ticket),
        capture_output=True,
        timeout=60,
    )
    assert b"loaded" not in result.stdout, result
    assert not root.exists()
