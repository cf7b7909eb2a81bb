"""DirectoryStorage: nothing waits forever, nothing leaks, a full disk frees.

Real mechanisms only: a process really stopped by SIGSTOP while it holds the
writer lock (checked in /proc/locks), a real SQLite lock held by another
process, a real small tmpfs mounted in a private mount namespace, and the
garbage collector really run inside a store's own transaction.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from blobleases import BlobManager, ContentId, LeaseId, StorageError
from blobleases.directory import DirectoryStorage
from blobleases.testing import blob


def put(storage: DirectoryStorage, data: bytes) -> tuple[ContentId, LeaseId]:
    lid = LeaseId.new()
    return storage.store_bytes(data, lid), lid


def _inode(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def _write_lockers(path: Path, kind: str) -> set[int]:
    """Pids holding a write lock of ``kind`` (FLOCK, POSIX) on ``path``, from /proc/locks."""
    want = _inode(path)
    pids = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 6 or parts[1] == "->" or parts[1] != kind or parts[3] != "WRITE":
                continue
            major, minor, inode = parts[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == want:
                pids.add(int(parts[4]))
    return pids


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")


def _wait_stopped(pid: int) -> None:
    while not _stopped(pid):
        time.sleep(0.0005)


_CHURN = """
import sys
from blobleases import ContentId, LeaseId
from blobleases.directory import DirectoryStorage
storage = DirectoryStorage(sys.argv[1])
cid = storage.store_bytes(b"held by the churning child", LeaseId.new())
print("ready", flush=True)
while True:
    lid = LeaseId.new()
    storage.lease_by_content(cid, lid)
    storage.advise_lease_dropped(lid, cid)
"""


@pytest.fixture
def churner(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A child process writing to a store in a loop, as fast as it can."""
    if not os.path.exists("/proc/locks"):
        pytest.skip("needs /proc/locks to see which process holds the writer lock")
    root = tmp_path / "store"
    DirectoryStorage(root).close()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHURN, str(root)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        yield root, child
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGCONT)
        child.kill()
        child.wait()


def _stop_while_holding(pid: int, path: Path, kind: str) -> None:
    """SIGSTOP ``pid`` at a moment it holds a write lock on ``path``
    (stopping and continuing it until it is caught so)."""
    for _ in range(20_000):
        os.kill(pid, signal.SIGSTOP)
        _wait_stopped(pid)
        if pid in _write_lockers(path, kind):
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.0002)
    pytest.fail(f"never caught pid {pid} holding {path}")


# == item 1: every wait for another process is bounded by lock_timeout ====================


def test_a_stopped_writer_gives_storage_error_naming_the_lock_and_its_pid(
    churner: tuple[Path, subprocess.Popen[str]],
) -> None:
    root, child = churner
    storage = DirectoryStorage(root, lock_timeout=1)
    try:
        cid, lid = put(storage, blob(1000, 1))
        _stop_while_holding(child.pid, root / "lock", "FLOCK")
        try:
            for attempt in (
                lambda: storage.lease_by_content(cid, LeaseId.new()),
                lambda: storage.advise_lease_dropped(lid, cid),
                storage.collect,
            ):
                t0 = time.monotonic()
                with pytest.raises(StorageError) as info:
                    attempt()
                assert time.monotonic() - t0 < 60
                message = str(info.value)
                assert "timed out after 1 s" in message, message
                assert f"writer lock {str(root / 'lock')!r}" in message, message
                assert f"pid {child.pid} (stopped)" in message, message
        finally:
            os.kill(child.pid, signal.SIGCONT)
        # everything works after, beside the churning child (with the default
        # lock_timeout: on a busy machine the child may win the lock often)
        with DirectoryStorage(root) as after:
            lid2 = LeaseId.new()
            after.lease_by_content(cid, lid2)
            assert after.get_data(cid, lid2) == blob(1000, 1)
            after.advise_lease_dropped(lid, cid)
            after.collect()
            assert not after.verify()
    finally:
        storage.close()


def test_a_stopped_writer_blocks_no_other_thread_beyond_lock_timeout(
    churner: tuple[Path, subprocess.Popen[str]],
) -> None:
    """A second thread waits for the first (which waits for the stopped
    process) at most lock_timeout too, and the helper that waits for the
    flock hands it over once the process continues."""
    root, child = churner
    storage = DirectoryStorage(root, lock_timeout=1)
    try:
        cid, _ = put(storage, blob(1000, 2))
        _stop_while_holding(child.pid, root / "lock", "FLOCK")
        errors: list[BaseException] = []

        def lease() -> None:
            try:
                storage.lease_by_content(cid, LeaseId.new())
            except StorageError as exc:
                errors.append(exc)

        try:
            threads = [threading.Thread(target=lease) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not any(t.is_alive() for t in threads)
        finally:
            os.kill(child.pid, signal.SIGCONT)
        assert len(errors) == 3 and all("timed out" in str(e) for e in errors), errors
        # the helper still waiting for the flock hands it over, to a new wait
        with DirectoryStorage(root) as after:
            for _ in range(50):
                lid = LeaseId.new()
                after.lease_by_content(cid, lid)
                after.advise_lease_dropped(lid, cid)
    finally:
        storage.close()


_SQLITE_HOLDER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(3600)
"""


def test_index_locked_by_another_process_gives_storage_error_naming_it(tmp_path: Path) -> None:
    """Another program holding SQLite's write lock on the index (not the
    writer flock): the store's busy wait ends at lock_timeout."""
    if not os.path.exists("/proc/locks"):
        pytest.skip("needs /proc/locks to see which process holds the index lock")
    root = tmp_path / "store"
    storage = DirectoryStorage(root, lock_timeout=1)
    try:
        cid, _ = put(storage, blob(1000, 3))
        index = root / "index.sqlite3"
        child = subprocess.Popen(
            [sys.executable, "-c", _SQLITE_HOLDER, str(index)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None and child.stdout.readline() == "locked\n"
            with pytest.raises(StorageError) as info:
                storage.lease_by_content(cid, LeaseId.new())
            message = str(info.value)
            assert "cannot lock the index" in message and str(index) in message, message
            assert "waited 1 s" in message and f"pid {child.pid}" in message, message
            with pytest.raises(StorageError) as info:
                DirectoryStorage(root, lock_timeout=1)
            message = str(info.value)
            assert "cannot open the index" in message and str(index) in message, message
            assert "waited 1 s" in message and f"pid {child.pid}" in message, message
        finally:
            child.kill()
            child.wait()
        lid2 = LeaseId.new()
        storage.lease_by_content(cid, lid2)
        assert storage.get_data(cid, lid2) == blob(1000, 3)
    finally:
        storage.close()


def test_another_thread_inside_a_transaction_is_waited_for_at_most_lock_timeout(
    tmp_path: Path,
) -> None:
    """A thread descheduled inside its transaction (held here by a profile
    hook that blocks when its SQLite call returns mid-transaction): another
    thread, through another handle, gets StorageError at lock_timeout."""
    root = tmp_path / "store"
    first = DirectoryStorage(root)
    second = DirectoryStorage(root, lock_timeout=1)
    try:
        cid, _ = put(first, blob(500, 4))
        inside, go_on = threading.Event(), threading.Event()

        def hook(frame: FrameType, event: str, arg: Any) -> None:
            conn = getattr(arg, "__self__", None)
            if (
                event == "c_return"
                and isinstance(conn, sqlite3.Connection)
                and conn.in_transaction
                and not inside.is_set()
            ):
                inside.set()
                go_on.wait(120)

        def slow_writer() -> None:
            sys.setprofile(hook)
            try:
                first.lease_by_content(cid, LeaseId.new())
            finally:
                sys.setprofile(None)

        writer = threading.Thread(target=slow_writer)
        writer.start()
        try:
            assert inside.wait(60)
            with pytest.raises(StorageError) as info:
                second.lease_by_content(cid, LeaseId.new())
            message = str(info.value)
            assert "timed out after 1 s" in message, message
            assert f"another thread of this process (pid {os.getpid()})" in message, message
        finally:
            go_on.set()
            writer.join(60)
        second.lease_by_content(cid, LeaseId.new())
    finally:
        first.close()
        second.close()


# == item 12: a lease or reader released by the garbage collector mid-transaction =========


def _collect_garbage_inside_a_transaction() -> list[int]:
    """Install a profile hook that runs the garbage collector once, the
    first time an SQLite call returns while its connection is inside a
    transaction: what the collector does when an allocation there crosses
    its threshold. Returns the list it appends gc.collect()'s result to."""
    fired: list[int] = []

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        conn = getattr(arg, "__self__", None)
        if (
            not fired
            and event == "c_return"
            and isinstance(conn, sqlite3.Connection)
            and conn.in_transaction
        ):
            fired.append(gc.collect())

    sys.setprofile(hook)
    return fired


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        sys.setprofile(None)
        if enabled:
            gc.enable()


def _cycle(obj: object) -> None:
    """Put ``obj`` in a reference cycle that only the collector frees."""
    ring: list[object] = [obj]
    ring.append(ring)


@pytest.mark.parametrize("same_handle", [True, False])
def test_lease_collected_inside_a_transaction_is_ended_right_after(
    tmp_path: Path, no_automatic_gc: None, same_handle: bool
) -> None:
    # another handle's nested transaction would wait for this one's lock
    policies: dict[str, Any] = {} if same_handle else {"lock_timeout": 5}
    storage = DirectoryStorage(tmp_path / "store", **policies)
    other = storage if same_handle else DirectoryStorage(tmp_path / "store", **policies)
    try:
        cid, _ = put(storage, blob(300, 5))
        lease = BlobManager(other).get_by_content_id(cid)
        lost = lease.lease_id
        _cycle(lease)
        del lease
        fired = _collect_garbage_inside_a_transaction()
        try:
            new_cid, _ = put(storage, blob(400, 6))
        finally:
            sys.setprofile(None)
        assert fired and fired[0] > 0
        assert lost not in {info.lease_id for info in storage.iter_leases()}
        assert storage.stat(cid).lease_count == 1
        assert storage.contains(new_cid)
    finally:
        if other is not storage:
            other.close()
        storage.close()


def test_reader_collected_inside_a_transaction_releases_its_hold_right_after(
    tmp_path: Path, no_automatic_gc: None
) -> None:
    storage = DirectoryStorage(tmp_path / "store")
    try:
        with BlobManager(storage).store(blob(300, 7)) as lease:
            reader = lease.get_reader()
            assert storage.stat(lease.content_id).reader_count == 1
            _cycle(reader)
            del reader
            fired = _collect_garbage_inside_a_transaction()
            try:
                lid = LeaseId.new()
                storage.lease_by_content(lease.content_id, lid)
            finally:
                sys.setprofile(None)
            assert fired and fired[0] > 0
            assert storage.stat(lease.content_id).reader_count == 0
            storage.advise_lease_dropped(lid, lease.content_id)
        assert not storage.contains(lease.content_id)
    finally:
        storage.close()


# == item 2: a full filesystem never wedges the store =======================================

_FILL = """
import os, signal, sys
from blobleases import LeaseId, StorageError, StoreFull
from blobleases.directory import DirectoryStorage

root, mode = sys.argv[1], sys.argv[2]


def fill(storage):
    # stores of ever smaller blobs until even the smallest fails: the
    # filesystem is then full to its last block
    held, failures = [], []
    for size in (256 << 10, 64 << 10, 16 << 10, 4096, 1024, 256, 64, 16):
        for _ in range(100_000):
            lid = LeaseId.new()
            try:
                cid = storage.store_bytes(os.urandom(size), lid)
            except (StorageError, StoreFull) as exc:
                failures.append(str(exc))
                break
            held.append((cid, lid))
    print("full:", len(held), "blobs; last error:", failures[-1], flush=True)
    return held


if mode == "fill-and-die":
    storage = DirectoryStorage(root)
    fill(storage)
    print("stats:", storage.stats(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

storage = DirectoryStorage(root)
if mode == "fill-and-free":
    held = fill(storage)
    # a blob corrupted in place (no new blocks): repair frees it on the full disk
    broken_cid, broken_lid = held.pop(0)
    fd = os.open(storage.blob_path(broken_cid), os.O_WRONLY)
    os.pwrite(fd, b"!", 0)
    os.close(fd)
    full = storage.stats()
    report = storage.verify(repair=True)
    print("repair on a full disk:", report, flush=True)
    assert report.corrupted == [broken_cid] and report.repaired, report
    assert storage.stats().bytes < full.bytes
    held += fill(storage)
    before = storage.stats()
    print("before:", before.blobs, before.bytes, flush=True)
    half = held[: len(held) // 2]
    for cid, lid in half:
        storage.advise_lease_dropped(lid, cid)
    print("dropped:", len(half), flush=True)
    report = storage.collect()
    print("collect:", report, flush=True)
    print("verify:", storage.verify(repair=True), flush=True)
    after = storage.stats()
    print("after:", after.blobs, after.bytes, flush=True)
    assert after.bytes < before.bytes and after.blobs == before.blobs - len(half), after
    # the space is usable again, and the store frees again once refilled
    more = fill(storage)
    for cid, lid in held[len(half):] + more:
        storage.advise_lease_dropped(lid, cid)
    print("all dropped", flush=True)
else:  # reopen: the filler was killed holding its leases on a full disk
    before = storage.stats()
    print("before:", before.blobs, before.bytes, flush=True)
    report = storage.collect()
    print("collect:", report, flush=True)
    print("verify:", storage.verify(repair=True), flush=True)
    more = fill(storage)
    for cid, lid in more:
        storage.advise_lease_dropped(lid, cid)
print("stats:", storage.stats(), flush=True)
print("verify:", storage.verify(repair=True), flush=True)
storage.collect()
final = storage.stats()
assert final.blobs == 0 and final.bytes == 0 and final.leases == 0, final
assert not storage.verify()
print("ok", flush=True)
"""


def _in_small_tmpfs(tmp_path: Path, commands: list[list[str]], size: str = "4m") -> list[str]:
    """Run ``commands`` (argv lists, ``{store}`` replaced by the store path)
    one after another in a private mount namespace with a ``size`` tmpfs;
    their outputs. Skips if the namespace or the mount is refused."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare to mount a small tmpfs")
    mount = tmp_path / "small"
    mount.mkdir(mode=0o700)
    store = f"{mount}/store"
    marker = "=== next command ==="
    lines = [f"mount -t tmpfs -o size={size},mode=0700 tmpfs {mount} || exit 99"]
    for argv in commands:
        quoted = " ".join(shlex.quote(a.replace("{store}", store)) for a in argv)
        lines.append(f"{quoted}; echo {marker} $?")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", "\n".join(lines)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    if result.returncode == 99 or (result.returncode != 0 and marker not in result.stdout):
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()[-300:]}")
    outputs = result.stdout.split(marker)
    assert len(outputs) == len(commands) + 1, result.stdout + result.stderr
    return [out + f"\n--- stderr:\n{result.stderr[-3000:]}" for out in outputs[:-1]]


def test_a_full_filesystem_still_drops_collects_and_repairs(tmp_path: Path) -> None:
    (out,) = _in_small_tmpfs(tmp_path, [[sys.executable, "-c", _FILL, "{store}", "fill-and-free"]])
    assert "full:" in out, out
    assert "ok" in out.splitlines() and "all dropped" in out, out


def test_a_full_filesystem_is_freed_after_its_filler_died_and_it_is_reopened(
    tmp_path: Path,
) -> None:
    killed, reopened = _in_small_tmpfs(
        tmp_path,
        [
            [sys.executable, "-c", _FILL, "{store}", "fill-and-die"],
            [sys.executable, "-c", _FILL, "{store}", "reopen"],
        ],
    )
    assert "full:" in killed and "stats:" in killed, killed
    assert "ok" in reopened.splitlines(), reopened


# == item 11: long work is done in short transactions ======================================


def _watch_commits(index: Path, table: str) -> list[int]:
    """Install a profile hook that, whenever an SQLite call of this thread
    returns outside a transaction, counts the rows of ``table`` through a
    connection of its own: the counts other processes could see. Returns
    the list of counts (consecutive repeats left out)."""
    watcher = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    counts: list[int] = [watcher.execute(f"SELECT count(*) FROM {table}").fetchone()[0]]

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        conn = getattr(arg, "__self__", None)
        if (
            event == "c_return"
            and isinstance(conn, sqlite3.Connection)
            and conn is not watcher
            and not conn.in_transaction
        ):
            count = watcher.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            if counts[-1] != count:
                counts.append(count)

    sys.setprofile(hook)
    return counts


_HOLD_MANY = """
import os, sys
from blobleases import LeaseId
from blobleases.directory import DirectoryStorage
storage = DirectoryStorage(sys.argv[1])
for i in range(int(sys.argv[2])):
    storage.store_bytes(b"held by a process about to die %d" % i, LeaseId.new())
print("stored", flush=True)
sys.stdin.read()
"""


def test_collect_reaps_a_dead_process_in_short_transactions(tmp_path: Path) -> None:
    n = 3000
    root = tmp_path / "store"
    DirectoryStorage(root).close()
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD_MANY, str(root), str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    assert child.stdout is not None and child.stdout.readline() == "stored\n"
    child.kill()
    child.wait()
    storage = DirectoryStorage(root)
    try:
        counts = _watch_commits(root / "index.sqlite3", "leases")
        try:
            report = storage.collect()
        finally:
            sys.setprofile(None)
        assert report.leases_reaped == n and report.blobs_deleted == n, report
        assert report.processes_reaped == 1 and report.rows_removed == 0, report
        assert counts[0] == n and counts[-1] == 0, counts
        # others saw the leases go a slice at a time, not all in one transaction
        assert len(counts) > 3, counts
        stats = storage.stats()
        assert (stats.blobs, stats.leases, stats.bytes) == (0, 0, 0)
        assert not storage.verify()
    finally:
        storage.close()


def test_collect_removes_rows_of_missing_files_in_short_transactions(tmp_path: Path) -> None:
    n = 3000
    storage = DirectoryStorage(tmp_path / "store")
    try:
        cids = [storage.store_bytes(b"soon missing %d" % i, LeaseId.new()) for i in range(n)]
        kept, kept_lid = put(storage, blob(100, 9))
        for cid in cids:
            os.unlink(storage.blob_path(cid))
        counts = _watch_commits(storage.root / "index.sqlite3", "content")
        try:
            report = storage.collect()
        finally:
            sys.setprofile(None)
        assert report.rows_removed == n and report.blobs_deleted == 0, report
        assert report.leases_reaped == 0 and report.files_removed == 0, report
        assert counts[0] == n + 1 and counts[-1] == 1, counts
        assert len(counts) > 3, counts
        assert storage.get_data(kept, kept_lid) == blob(100, 9)
        assert not storage.verify()
    finally:
        storage.close()


def test_repair_removes_many_broken_blobs_in_short_transactions(tmp_path: Path) -> None:
    n = 3000
    storage = DirectoryStorage(tmp_path / "store")
    try:
        cids = [storage.store_bytes(b"soon corrupted %d" % i, LeaseId.new()) for i in range(n)]
        for cid in cids:
            path = storage.blob_path(cid)
            data = path.read_bytes()
            path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        counts = _watch_commits(storage.root / "index.sqlite3", "content")
        try:
            report = storage.verify(repair=True)
        finally:
            sys.setprofile(None)
        assert len(report.corrupted) == n and report.repaired, report
        assert counts[0] == n and counts[-1] == 0, counts
        assert len(counts) > 3, counts
        assert not storage.verify() and storage.stats().blobs == 0
    finally:
        storage.close()


_READ_AT_EXIT = """
import sys
from blobleases import LeaseId
from blobleases.directory import DirectoryStorage
storage = DirectoryStorage(sys.argv[1])
lid = LeaseId.new()
cid = storage.store_bytes(b"read until the interpreter exits", lid)
reader = storage.get_reader(cid, lid)  # released by the last garbage collection
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_reader_released_at_interpreter_exit_waits_for_a_busy_lock(
    churner: tuple[Path, subprocess.Popen[str]],
) -> None:
    """At interpreter exit no thread can start or run: the release of a
    reader freed by the last garbage collection still waits for the writer
    lock (held by a stopped process until it continues) and then ends."""
    root, other = churner
    child = subprocess.Popen(
        [sys.executable, "-c", _READ_AT_EXIT, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        _stop_while_holding(other.pid, root / "lock", "FLOCK")
        try:
            assert child.stdin is not None
            child.stdin.close()  # the child exits, and its reader is released
            time.sleep(0.5)
        finally:
            os.kill(other.pid, signal.SIGCONT)
        child.wait(timeout=120)
        assert child.stderr is not None
        err = child.stderr.read()
        assert child.returncode == 0, err
        assert "Exception" not in err and "Error" not in err, err
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
