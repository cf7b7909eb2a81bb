"""DirectoryStorage: the embedded default store, shared by many processes.

Layout under the root (mode 0700, files 0600)::

    format                  marker: this directory is a blobleases store
    index.sqlite3           the SQLite index (WAL), see :mod:`.directory_index`
    lock                    writers queue on an flock of it (see _WriterLock)
    owners/<token>          one per process using the store: the process
                            holds an fcntl lock on it while it lives (see
                            :class:`~blobleases.liveness.OwnerLock`)
    reserve                 space kept back so that freeing works on a full
                            filesystem (see _frees)
    blobs/sha256/ab/<hex>   one file per blob, named by its validated content id
    tmp/<token>-<random>.tmp
                            blobs being written; the name tells which process
                            (its owner token) writes it, so leftovers of dead
                            writers are recognised and removed

How the pieces stay consistent across processes and crashes:

* every change to the index is one ``BEGIN IMMEDIATE`` transaction;
* a new blob is written to ``tmp/``, then, inside the transaction that adds
  its row, renamed into place: file and row appear together;
* a blob file is unlinked only after the transaction that deleted its row
  has committed, by a second transaction that checks, under the same write
  lock, that no newer row names the file (a store that raced the delete has
  then re-created the row and its file stays);
* a crash between the two leaves an orphaned file, which ``collect()``
  removes (again checking under the write lock);
* long work (collect, repair, reaping thousands of leases) commits in
  slices of a few milliseconds, letting the write lock go in between, and
  each slice leaves the index consistent;
* every wait for another process (the writer flock, SQLite's lock, another
  thread's transaction) ends after ``lock_timeout`` with StorageError
  naming what it waited for and the pid holding it (from /proc/locks).

Leases and reader holds record their owner: for a process's own leases and
readers its owner token, whose lock file the kernel keeps locked exactly as
long as the process lives, so liveness is judged the same from any pid
namespace (containers sharing a volume) and pid reuse cannot fool it; for
leases taken on behalf of another pid (``LeaseId.new(pid=...)``), that pid
and its start time, judged only by processes of the pid namespace that
recorded them. Owners found dead are reaped by any process at most every
``reap_interval`` seconds (the last reap time is shared through the index)
and always by ``collect()``. ``advise_of_pid`` and ``advise_pid_terminated``
act on pids of the caller's own pid namespace only.

Choices where the contract is silent:

* A deleted index is refused (StorageError naming
  :meth:`DirectoryStorage.rebuild_index`), never silently recreated: the
  leases it recorded cannot be recovered, and processes that still have the
  old index open would keep using it. ``rebuild_index`` re-indexes the blob
  files that hash right, as unreferenced content.
* Content whose only leases expired counts as absent at once (leasing it
  raises ContentNotFound); its row goes at the next expiry pass (any write,
  read-only introspection, reap or collect, and the close of a handle or
  the exit of its process, which end at most a few thousand leases).
* Accesses for LRU eviction are written to the index in batches (at most a
  second late, and before any eviction or ``stat()`` in this process).
* One SQLite connection per handle and process, serialized by a lock; file
  reads and writes happen outside the lock.
* A reader still open when its storage is closed keeps its hold until its
  process ends (the store is not reachable to release it).
* The caller must not change a buffer while it is being stored: it is
  hashed and written as given, without a copy.
* A store this process cannot write (read-only filesystem or permissions)
  opens read-only instead of being refused: listing, reading and
  ``verify()`` work; every change raises StorageError saying it is
  read-only. Its leases and reader holds live in the process only (the
  store cannot record them), so they cannot keep the bytes from a writer
  elsewhere (a store mounted read-only here, writable there).
* A handle keeps at most a small share of the process's descriptor limit
  (4 to 256) of shard directory fds, least recently used closed first.
* Through a corrupted index nothing is repaired: ``verify()`` reports it in
  ``index_errors`` (and checks nothing else); other operations raise
  StorageError naming the index.
* A lease or reader released (by the garbage collector, a signal handler)
  while its thread is inside a transaction of the same store is released
  right after that transaction lets the writer lock go.
* The reserve is 1/16 of the filesystem, between 64 KiB and 1 MiB: room
  for the transactions that free space. It is given back only to work that
  frees (a store on a full filesystem fails and leaves it), and made again
  once there is room. Threads sharing one handle also wait for each other
  on the handle's lock, each wait on another process bounded as above.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import math
import mmap
import os
import re
import resource
import shutil
import sqlite3
import stat as stat_module
import sys
import tempfile
import threading
import time
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as _wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Concatenate, NoReturn, ParamSpec, TypeVar, cast
from urllib.parse import quote

from . import file_pool, forksafe, ingest, policy_rules
from .content_id import ALGORITHMS, ContentId, new_hasher
from .directory_index import (
    check_schema,
    connect,
    create_schema,
    has_lease_created,
    pid_owner,
)
from .engine import Engine
from .errors import (
    BlobLeaseError,
    ContentNotFound,
    IntegrityError,
    InvalidContentId,
    InvalidLeaseId,
    StorageError,
)
from .holders import scope_host
from .lease_id import LeaseId
from .liveness import (
    START_TIME_TOLERANCE,
    OwnerLock,
    can_judge_pids,
    is_alive,
    is_owner_token,
    own_start_time,
    owner_alive,
    pid_scope,
    probe_owner,
    process_start_time,
    process_token,
    remove_dead_owner,
    same_start,
)
from .reader import BlobReader, BufferSource
from .reports import (
    BlobInfo,
    CollectReport,
    LeaseInfo,
    ReaderInfo,
    StorageStats,
    VerifyReport,
    WhyReport,
)
from .storage import BlobStorage, FileSource

__all__ = ["DirectoryStorage", "default_root"]

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])


def _index_errors(method: _F) -> _F:
    """Index errors that reach a backend method (SQLite's, and ids in the
    index that do not parse) leave it as StorageError naming the index."""

    @functools.wraps(method)
    def translating(self: DirectoryStorage, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.Error, InvalidContentId, InvalidLeaseId) as exc:
            raise self._index_error(exc) from exc

    return cast(_F, translating)


_INDEX = "index.sqlite3"
_MARKER = "format"
_MARKER_TEXT = b"blobleases directory store, format 1\n"
_MAX_WRITE = 1 << 30
_ACCESS_FLUSH_SECONDS = 1.0
# store_bytes of at least this many bytes hashes in a worker thread while the
# temporary file is written (below it, the hand-off costs more than it saves)
_OVERLAP_MIN = 256 << 10
_ACCESS_FLUSH_ENTRIES = 512
# Long work (collect, repair, reaping many leases) commits and lets the
# writer lock go after this long, pausing a moment for waiting processes.
_SLICE_SECONDS = 0.002
_SLICE_PAUSE = 0.0002
_SLICE_KEYS = 64  # content ids settled between slice checks
_MAX_WAIT = min(threading.TIMEOUT_MAX, 1e9)  # lock_timeout beyond it: as good as forever
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_FULL = 13
_WAL_WRITE_LOCK = 120  # SQLite's WAL write lock: this byte of the -shm file
# Space kept in reserve (a file in the root) so that freeing works on a full
# filesystem: 1/16 of the filesystem, between 64 KiB and 1 MiB.
_RESERVE = "reserve"
_RESERVE_MAX = 1 << 20
_RESERVE_MIN = 64 << 10
_SIZE_CACHE_ENTRIES = 1 << 16
# close() ends at most this many expired leases (bounded work at exit)
_CLOSE_EXPIRE_LIMIT = 2000
_EXIT_WAIT = 5.0  # seconds the exit pass waits for a thread still using a handle
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX2 = re.compile(r"[0-9a-f]{2}")
_TMP_NAME = re.compile(r"([0-9a-f]{32})-[0-9a-f]{16}\.tmp")
# temporary files of writers of schema version 1, named by pid and start time
_TMP_NAME_V1 = re.compile(r"([1-9][0-9]*)-([0-9]+)-[0-9a-f]{16}\.tmp")
_SHM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHM_BASE = "/dev/shm"

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _O_CLOEXEC
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC
_O_TMP = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _O_CLOEXEC

# -- SQL used on hot paths ----------------------------------------------------------

_SQL_HELD = (
    "SELECT c.size FROM leases l JOIN content c ON c.cid = l.cid "
    "WHERE l.cid = ? AND l.lid = ? AND (l.expires_at IS NULL OR l.expires_at > ?)"
)
# Holds a lease on content that is present: retained, read, or leased by an
# unexpired lease (content whose only leases expired is gone, though its row
# waits for the next expiry pass). A held but expired lease is renewed.
_SQL_HELD_ONLY = (
    "SELECT 1 FROM leases WHERE cid = ? AND lid = ? AND (expires_at IS NULL OR expires_at > ?)"
)
_SQL_INSERT_LEASE = (
    "INSERT INTO leases(cid, lid, pid, start, expires_at, detached, owner, created) "
    "SELECT :cid, :lid, :pid, :start, :expires, :detached, :owner, :now FROM content c "
    "WHERE c.cid = :cid AND ("
    "c.retained IS NOT NULL "
    "OR EXISTS(SELECT 1 FROM leases WHERE cid = :cid AND (expires_at IS NULL OR expires_at > :now)) "
    "OR EXISTS(SELECT 1 FROM holds WHERE cid = :cid)) "
    "ON CONFLICT(cid, lid) DO UPDATE SET pid = excluded.pid, start = excluded.start, "
    "expires_at = excluded.expires_at, detached = excluded.detached, owner = excluded.owner, "
    "created = excluded.created WHERE leases.expires_at IS NOT NULL AND leases.expires_at <= :now"
)
# The first lease of content just added in the same transaction.
_SQL_INSERT_FIRST_LEASE = (
    "INSERT INTO leases(cid, lid, pid, start, expires_at, detached, owner, created) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQL_ADD_OWNER = "INSERT OR IGNORE INTO owners(owner, pid, start, scope) VALUES (?, ?, ?, ?)"
_SQL_CONTENT = "SELECT size, retained FROM content WHERE cid = ?"
_SQL_HELD_PRESENT = (
    "SELECT EXISTS(SELECT 1 FROM leases WHERE cid = :cid AND lid = :lid "
    "AND (expires_at IS NULL OR expires_at > :now)), "
    "EXISTS(SELECT 1 FROM content WHERE cid = :cid)"
)
_SQL_REFERENCED = (
    "SELECT EXISTS(SELECT 1 FROM leases WHERE cid = :cid "
    "AND (expires_at IS NULL OR expires_at > :now)) "
    "OR EXISTS(SELECT 1 FROM holds WHERE cid = :cid)"
)
_SQL_RETAINED_IN_ORDER = (
    "SELECT cid, size FROM content WHERE retained IS NOT NULL ORDER BY retained"
)
# The size of content that is present (as _SQL_INSERT_LEASE sees it).
_SQL_PRESENT_SIZE = (
    "SELECT size FROM content c WHERE c.cid = :cid AND (c.retained IS NOT NULL "
    "OR EXISTS(SELECT 1 FROM leases WHERE cid = :cid AND (expires_at IS NULL OR expires_at > :now)) "
    "OR EXISTS(SELECT 1 FROM holds WHERE cid = :cid))"
)
_SQL_EXPIRED = "SELECT cid FROM leases WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT 1"
# The row of new content; a no-op (rowcount 0) if the content has a row.
_SQL_ADD_CONTENT = (
    "INSERT INTO content(cid, size, created, last_access, retained) VALUES (:cid, :size, :now, :now, NULL) "
    "ON CONFLICT(cid) DO NOTHING"
)
# Deletes content that is unreferenced (no unexpired lease, no reader) and
# not retained; returns its size (no row if it stays).
_SQL_DELETE_UNREFERENCED = (
    "DELETE FROM content WHERE cid = :cid AND retained IS NULL "
    "AND NOT EXISTS(SELECT 1 FROM leases WHERE cid = :cid "
    "AND (expires_at IS NULL OR expires_at > :now)) "
    "AND NOT EXISTS(SELECT 1 FROM holds WHERE cid = :cid) RETURNING size"
)
# A blob of at most this many bytes is stored in one transaction that writes
# its temporary file too (no look-up before it; a dedup hit writes nothing).
# Bigger blobs are written before their transaction, outside the write lock.
_SMALL_STORE = 16 << 10

# Fork safety. SQLite keeps per-process bookkeeping of the locks each open
# file holds; a child that inherits a connection inherits that bookkeeping
# but not the kernel locks behind it. A new connection in the child would
# trust the stale bookkeeping (and skip taking the locks that tell other
# processes it is there: the parent closing its connection would then
# delete the WAL under the child). So every storage's lock is taken before
# fork (no thread is inside SQLite at the fork), and the child closes the
# inherited connection at once (releasing nothing of the parent's: fcntl
# locks belong to the parent process) before it opens its own
# (blobleases.forksafe does both).
# Inherited connections whose close failed in the child: kept, never used.
_INHERITED: list[sqlite3.Connection] = []


def _fork_lock(storage: DirectoryStorage) -> threading.RLock:
    return storage._lock


def _finish_at_exit(ref: weakref.ref[DirectoryStorage]) -> None:
    """At interpreter exit: :meth:`DirectoryStorage._finish` on a handle
    left open (a no-op for one garbage-collected before)."""
    storage = ref()
    if storage is None or storage._temporary or not storage._lock.acquire(True, _EXIT_WAIT):
        return  # (a temporary store is removed at exit anyway)
    try:
        with contextlib.suppress(Exception):
            storage._finish()
    finally:
        storage._lock.release()


def default_root() -> Path:
    """The store the command line uses when none is named: ``$BLOBLEASES_STORE``
    if set, else the user cache directory (platformdirs) ``blobleases``."""
    env = os.environ.get("BLOBLEASES_STORE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("blobleases"))


def _error(message: str, exc: BaseException) -> StorageError:
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return StorageError(f"{message}: {detail}")


def _write_all(fd: int, view: memoryview) -> None:
    total = view.nbytes
    done = 0
    while done < total:
        done += os.write(fd, view[done : done + _MAX_WRITE])


def _read_exact(fd: int, size: int) -> bytes:
    if size <= _MAX_WRITE:
        data = os.read(fd, size)
        if len(data) == size:
            return data
        parts = [data]
        got = len(data)
    else:
        parts, got = [], 0
    while got < size:
        chunk = os.read(fd, min(size - got, _MAX_WRITE))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _remove_tree(root: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        with contextlib.suppress(OSError):
            st = os.stat(root)
            OwnerLock.forget((st.st_dev, st.st_ino))
        shutil.rmtree(root, ignore_errors=True)


def _shard_cap() -> int:
    """How many shard directory fds a handle keeps open: a small share of
    this process's descriptor limit (4 to 256)."""
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        return 16
    if soft == resource.RLIM_INFINITY:
        return 256
    return max(4, min(256, soft // 16))


def _writable(path: str) -> bool:
    """Whether this process can create files in directory ``path``."""
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    try:
        return not os.statvfs(path).f_flag & os.ST_RDONLY
    except OSError:
        return True


def _check_dir_stat(st: os.stat_result, path: str) -> None:
    if not stat_module.S_ISDIR(st.st_mode):
        raise StorageError(f"store root {path!r} is not a directory")
    if st.st_uid != os.geteuid():
        raise StorageError(
            f"refusing store root {path!r}: it is owned by uid {st.st_uid}, not by this "
            f"user (uid {os.geteuid()})"
        )
    if st.st_mode & 0o022:
        raise StorageError(
            f"refusing store root {path!r}: it is writable by group or others "
            f"(mode {stat_module.S_IMODE(st.st_mode):o}); chmod 700 it"
        )


def _proc_state(pid: int) -> str:
    """``" (stopped)"`` and the like for a process of this pid namespace, or ``""``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError, UnicodeDecodeError):
        return ""
    names = {"T": "stopped", "t": "stopped by a debugger", "D": "in uninterruptible I/O"}
    return f" ({names[state]})" if state in names else ""


def _lock_holders(fds: list[int], *, flock: bool, start: int | None = None) -> list[int]:
    """Pids (other than ours) holding a write lock on the files of ``fds``,
    from /proc/locks (Linux): flocks if ``flock``, else POSIX locks (those
    starting at byte ``start`` if given). Empty where unknown."""
    wanted: set[tuple[int, int, int]] = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            st = os.fstat(fd)
            wanted.add((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
    kinds = ("FLOCK",) if flock else ("POSIX", "OFDLCK")
    holders: list[int] = []
    try:
        with open("/proc/locks") as f:
            lines = f.readlines()
    except OSError:
        return holders
    me = os.getpid()
    for line in lines:
        parts = line.split()
        if len(parts) < 8 or parts[1] == "->" or parts[1] not in kinds or parts[3] != "WRITE":
            continue
        try:
            pid = int(parts[4])
            major, minor, inode = parts[5].split(":")
            where = (int(major, 16), int(minor, 16), int(inode))
            first = int(parts[6])
        except ValueError:
            continue
        if where not in wanted or pid in (me, -1, 0) or pid in holders:
            continue
        if start is not None and first != start:
            continue
        holders.append(pid)
    return holders


def _holders_text(fds: list[int], *, flock: bool, start: int | None = None) -> str:
    pids = _lock_holders(fds, flock=flock, start=start)
    if not pids:
        return "held by another process (its pid is not known here)"
    shown = ", ".join(f"{pid}{_proc_state(pid)}" for pid in pids)
    return f"held by pid {shown}"


def _is_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) says the filesystem is full."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(seen, sqlite3.Error) and getattr(seen, "sqlite_errorcode", 0) == _SQLITE_FULL:
            return True
        seen = seen.__cause__
    return False


def _is_busy(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is SQLite's busy timeout."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, sqlite3.Error):
            return getattr(seen, "sqlite_errorcode", 0) in (_SQLITE_BUSY, _SQLITE_LOCKED)
        seen = seen.__cause__
    return False


_P = ParamSpec("_P")


def _frees(
    method: Callable[Concatenate[DirectoryStorage, _P], _T],
) -> Callable[Concatenate[DirectoryStorage, _P], _T]:
    """For work that frees space (dropping, releasing, reaping, collecting,
    repairing): if it fails because the filesystem is full, the store's
    reserve is given back to the filesystem and the work done again, so the
    store can always free its own space. The reserve is made again once
    there is room."""

    @functools.wraps(method)
    def frees(self: DirectoryStorage, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            result = method(self, *args, **kwargs)
        except StorageError as exc:
            if not _is_full(exc) or not self._release_reserve():
                raise
            result = method(self, *args, **kwargs)
        if self._reserve_missing:
            self._ensure_reserve()
        return result

    return frees


def _mmap_source(mapped: mmap.mmap | None) -> BufferSource:
    """A reader source over a read-only mmap of a blob file (or nothing, for
    an empty blob: empty files cannot be mapped)."""
    if mapped is None:
        return BufferSource(memoryview(b""))

    def unmap() -> None:
        # A view the user still holds (getbuffer) keeps the mapping alive;
        # it is unmapped when that view is garbage-collected.
        with contextlib.suppress(BufferError):
            mapped.close()

    return BufferSource(memoryview(mapped), unmap)


class _WriterLock:
    """Serializes the writers of one store: a thread lock and an flock on
    ``<root>/lock``, one per process and root (every handle of the process
    shares it, so a thread may nest transactions of two handles).

    Taken before ``BEGIN IMMEDIATE``: the kernel wakes a waiting process as
    soon as the lock is free, where SQLite's busy handler polls with sleeps
    of up to 100 ms (measured: three processes contending for the write lock
    waited up to 430 ms, one of them starved; with the flock at most 30 ms,
    fairly shared). SQLite's own lock stays the authority; a dead holder's
    flock goes with its process.

    Every wait is bounded (``lock_timeout``): a blocking flock cannot be
    given a timeout, so a contended flock is waited for by a helper thread
    (one per process and root, started on first contention) while the
    caller waits on a condition with a timeout; on timeout the caller raises
    StorageError naming the holder's pid (from /proc/locks) and the helper,
    once it gets the lock, releases it unless a caller wants it again. While
    the helper waits, every caller goes through it (a non-blocking attempt
    on the same open file would succeed under the helper's feet). At
    interpreter exit, where no thread can start or run (a reader released
    by the last garbage collection), the lock is polled instead.

    ``owner`` is the thread holding the lock (0: none). Work that must not
    start a transaction inside that thread's own (a lease or reader released
    by the garbage collector mid-transaction) is put in ``deferred`` and run
    by that thread right after it lets the lock go."""

    _all: ClassVar[dict[str, _WriterLock]] = {}
    _all_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, fd: int, path: str) -> None:
        self.pid = os.getpid()
        self.fd = fd
        self.path = path
        self.rlock = threading.RLock()
        self.depth = 0
        # counts entries: a change tells _unlink_doomed that a transaction
        # (of another handle, in this thread) may have run meanwhile
        self.epoch = 0
        self.owner = 0
        self.deferred: list[Callable[[], None]] = []
        self._cond = threading.Condition(threading.Lock())
        self._wanted = False  # a caller waits for the helper to get the flock
        self._granted = False  # the helper got it for the caller
        self._pending = False  # the helper is inside a blocking flock
        self._failed: OSError | None = None  # the helper's flock failed
        self._helper: threading.Thread | None = None

    @classmethod
    def of(cls, root: str, root_fd: int) -> _WriterLock:
        key = os.path.realpath(root)
        with cls._all_lock:
            writer = cls._all.get(key)
            if writer is None or writer.pid != os.getpid():
                try:
                    fd = os.open(
                        "lock",
                        os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | _O_CLOEXEC,
                        0o600,
                        dir_fd=root_fd,
                    )
                except OSError as exc:
                    raise _error(f"cannot open the writer lock of {root!r}", exc) from exc
                writer = cls._all[key] = cls(fd, os.path.join(root, "lock"))
            return writer

    @classmethod
    def forget_inherited(cls) -> None:
        """In a forked child: drop the parent's locks (closing the inherited
        descriptors releases nothing: the parent still holds them)."""
        cls._all_lock = threading.Lock()
        for writer in cls._all.values():
            with contextlib.suppress(OSError):
                os.close(writer.fd)
        cls._all = {}

    def enter(self, timeout: float) -> None:
        """Take the lock, waiting at most ``timeout`` seconds for other
        threads and processes (StorageError naming the holder)."""
        if not self.rlock.acquire(True, min(timeout, _MAX_WAIT)):
            raise StorageError(
                f"timed out after {timeout:g} s waiting for the writer lock {self.path!r}: "
                f"another thread of this process (pid {os.getpid()}) holds it"
            )
        self.epoch += 1
        if self.depth == 0:
            self.owner = threading.get_ident()
            try:
                taken = False
                if not self._pending:
                    try:
                        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        taken = True
                    except BlockingIOError:
                        pass
                if not taken:
                    self._wait_flock(timeout)
            except BaseException as exc:
                self.owner = 0
                self.rlock.release()
                if isinstance(exc, OSError):
                    raise _error(f"cannot take the writer lock {self.path!r}", exc) from exc
                raise
        self.depth += 1

    def exit(self) -> None:
        self.depth -= 1
        last = self.depth == 0
        if last:
            self.owner = 0
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.rlock.release()
        if last and self.deferred:
            self._run_deferred()

    def _run_deferred(self) -> None:
        while True:
            try:
                work = self.deferred.pop(0)
            except IndexError:
                return
            try:
                work()
            except BlobLeaseError:
                pass  # as in the finalizer that deferred it (a closed store reaps)
            except Exception as exc:
                hook_args = types.SimpleNamespace(
                    exc_type=type(exc),
                    exc_value=exc,
                    exc_traceback=exc.__traceback__,
                    err_msg="Exception ignored in a deferred release",
                    object=work,
                )
                sys.unraisablehook(hook_args)

    def _wait_flock(self, timeout: float) -> None:
        """The flock is taken by another process: wait for it through the
        helper thread, at most ``timeout`` seconds (polling where no thread
        can start or run: at interpreter exit)."""
        deadline = time.monotonic() + timeout
        if sys.is_finalizing():
            self._poll_flock(timeout, deadline)
            return
        with self._cond:
            self._wanted = True
            if not self._pending:
                self._pending = True
                self._failed = None
                helper = self._helper
                if helper is not None and helper.is_alive():
                    self._cond.notify_all()
                else:
                    helper = threading.Thread(
                        target=self._wait_loop, name="blobleases-writer-lock", daemon=True
                    )
                    try:
                        helper.start()
                    except RuntimeError:  # shutting down: no new thread starts
                        self._pending = self._wanted = False
                        helper = None
                    self._helper = helper
            while self._helper is not None and not self._granted:
                failed, self._failed = self._failed, None
                if failed is not None:
                    self._wanted = False
                    raise _error(f"cannot take the writer lock {self.path!r}", failed)
                left = deadline - time.monotonic()
                if left <= 0:
                    self._wanted = False
                    raise self._timed_out(timeout)
                self._cond.wait(min(left, _MAX_WAIT))
            granted, self._granted = self._granted, False
        if not granted:
            self._poll_flock(timeout, deadline)

    def _poll_flock(self, timeout: float, deadline: float) -> None:
        delay = 0.0001
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            if time.monotonic() >= deadline:
                raise self._timed_out(timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def _timed_out(self, timeout: float) -> StorageError:
        return StorageError(
            f"timed out after {timeout:g} s waiting for the writer lock "
            f"{self.path!r}: {_holders_text([self.fd], flock=True)}"
        )

    def _wait_loop(self) -> None:
        """The helper thread: take the flock, blocking, whenever asked."""
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
            error: OSError | None = None
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            except OSError as exc:
                error = exc
            with self._cond:
                self._pending = False
                if error is None and self._wanted:
                    self._wanted = False
                    self._granted = True
                elif error is None:
                    with contextlib.suppress(OSError):
                        fcntl.flock(self.fd, fcntl.LOCK_UN)
                else:
                    self._failed = error
                self._cond.notify_all()


forksafe.on_child(_WriterLock.forget_inherited)


@dataclass(slots=True)
class _Tx:
    """One write transaction: its connection, its clock, and what it deleted."""

    db: sqlite3.Connection
    now: float
    writer: _WriterLock
    doomed: list[str] = field(default_factory=list)
    flushed: list[tuple[float, str]] = field(default_factory=list)
    stale: bool = False  # a hold found a row whose leases all expired
    dead_owners: list[str] = field(default_factory=list)  # lock files to remove after commit
    known: ContentId | None = None  # the id of a doomed key, if the caller has it
    deleted: int = 0
    freed: int = 0
    held: bool = True  # the writer lock and the SQLite transaction are held
    slice_at: float = 0.0  # (monotonic) when long work should slice; 0: not yet known


_MAX_ROOT_DEPTH = 256
"""The deepest store root accepted (os.makedirs recurses once per missing level)."""


class _IndexRoom:
    """The room verbs of :class:`blobleases.engine.RoomAdapter` over the
    index, inside the write transaction ``tx`` (keys: content ids as text).
    The lease lifecycle stays in SQL (bulk statements over many rows); the
    retain-or-delete decision and the eviction plan are the engine's."""

    __slots__ = ("db", "storage", "tx")

    def __init__(self, storage: DirectoryStorage, tx: _Tx) -> None:
        self.storage, self.tx, self.db = storage, tx, tx.db

    def unreferenced_size(self, key: str) -> int | None:
        if self.db.execute(_SQL_REFERENCED, {"cid": key, "now": self.tx.now}).fetchone()[0]:
            return None
        row = self.db.execute(_SQL_CONTENT, (key,)).fetchone()
        return None if row is None or row[1] is not None else int(row[0])

    def delete_if_unreferenced(self, key: str) -> None:
        tx = self.tx
        rows = self.db.execute(_SQL_DELETE_UNREFERENCED, {"cid": key, "now": tx.now}).fetchall()
        if rows:  # (one statement checks and deletes)
            self.db.execute("DELETE FROM leases WHERE cid = ?", (key,))  # expired ones
            tx.doomed.append(key)
            tx.deleted += 1
            tx.freed += int(rows[0][0])

    def delete_content(self, key: str) -> int:
        return self.storage._delete(self.tx, key)

    def count_evictions(self, blobs: int, freed: int) -> None:
        for name, n in (("evictions", blobs), ("evicted_bytes", freed)):
            self.db.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
                (name, n),
            )
        self.storage._note_evictions(blobs, freed)

    def retain(self, key: str) -> None:
        db = self.db
        db.execute("DELETE FROM leases WHERE cid = ?", (key,))  # expired ones
        seq = db.execute(
            "SELECT coalesce(max(retained), 0) + 1 FROM content WHERE retained IS NOT NULL"
        ).fetchone()[0]
        db.execute("UPDATE content SET retained = ? WHERE cid = ?", (seq, key))

    def retained_bytes(self) -> int:
        return int(
            self.db.execute(
                "SELECT coalesce(sum(size), 0) FROM content WHERE retained IS NOT NULL"
            ).fetchone()[0]
        )

    def retained_oldest_first(self) -> Iterator[tuple[str, int]]:
        return iter(self.db.execute(_SQL_RETAINED_IN_ORDER))

    def evictable_oldest_first(self) -> Iterator[tuple[str, int, bool]]:
        # Content with a reader (a hold) is never a candidate.
        cursor = self.db.execute(
            "SELECT cid, size FROM content c WHERE retained IS NULL AND NOT EXISTS "
            "(SELECT 1 FROM holds h WHERE h.cid = c.cid) ORDER BY last_access, cid"
        )
        return ((key, size, False) for key, size in cursor)

    def total_bytes(self) -> int:
        return int(self.db.execute("SELECT coalesce(sum(size), 0) FROM content").fetchone()[0])


def _check_root_path(root: str) -> str:
    """``root`` (absolute) if a store can live there, else ValueError naming it."""
    try:
        encoded = root.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate stands for a byte that is not UTF-8 (surrogateescape):
        # such a path exists on Linux, but the store's url and index (SQLite
        # takes UTF-8 file names) could not name it.
        raise ValueError(
            f"path {root!r} is not valid UTF-8 (it holds undecodable bytes): "
            "a store root must be a UTF-8 path"
        ) from None
    if b"\0" in encoded:
        raise ValueError(f"path {root!r} contains a NUL character")
    depth = root.count(os.sep)
    if depth > _MAX_ROOT_DEPTH:
        raise ValueError(
            f"path {root[:200]!r}... is {depth} directories deep: a store root may be at "
            f"most {_MAX_ROOT_DEPTH} deep"
        )
    return root


class DirectoryStorage(BlobStorage):
    """Blobs as files under ``path`` with an SQLite index, shared by every
    process that opens the same path (``open_storage(storage.url)``).

    Takes every policy keyword of :class:`~blobleases.policies.Policies`.
    A store is created (``path`` made with mode 0700 if needed) only in a
    missing or empty directory, and only when ``create`` is true; otherwise
    ``path`` must hold a store. Refused (StorageError saying why, with
    nothing created or changed): a path that is a file, is owned by another
    user or writable by group or others, a non-empty directory that is not
    a store, a store whose ``blobs/`` or ``tmp/`` is not ours, or one whose
    index was deleted (see :meth:`rebuild_index`). A store that this
    process cannot write (a read-only filesystem, or read-only permissions)
    opens read-only (:attr:`read_only`). Crash safe (a process killed at any
    point leaves nothing that ``verify()`` reports after the next
    ``collect()``) and fork safe (a forked child opens its own index
    connection on first use).

    A handle holds a bounded number of file descriptors whatever the number
    of blobs (the root, ``tmp/``, ``blobs/``, one per algorithm, and the
    shard directories used last: a small share of the descriptor limit) and
    notices when a directory it holds was removed or replaced: it looks the
    path up again before it concludes that a blob file is missing, and
    re-creates the directories it needs to store.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, create: bool = True, **policies: Any
    ) -> None:
        if not isinstance(create, bool):
            raise TypeError(f"create must be a bool, not {type(create).__name__}")
        super().__init__(**policies)
        self._setup(path, rebuild=False, create=create)

    # -- construction ------------------------------------------------------------

    def _setup(self, path: object, *, rebuild: bool, create: bool = True) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        raw = os.fspath(path)
        if not isinstance(raw, str):
            raise TypeError("path must be text, not bytes")
        if not raw:
            raise ValueError("path must not be empty")
        self._root = _check_root_path(os.path.abspath(os.path.expanduser(raw)))
        self._url = "file://" + quote(self._root, safe="/")
        self._index_path = os.path.join(self._root, _INDEX)
        self._safe = self.policies.durability == "safe"
        self._lock = threading.RLock()
        self._closed = False
        self._temporary = False
        self._owner_pid = os.getpid()
        self._db: sqlite3.Connection | None = None
        self._db_pid = 0
        self._mypid = 0
        self._mystart = 0.0
        self._scope = pid_scope()
        # this process's owner lock of the store, taken on first use; its
        # owners row is recorded once per connection (again after a rollback)
        self._owner_lock: OwnerLock | None = None
        self._owner = ""
        self._owner_recorded = False
        self._root_key = (0, 0)
        self._owners_fd = -1
        self._access: dict[str, float] = {}
        self._sizes: dict[str, int] = {}  # content sizes never change: a safe cache
        self._access_flush_at = 0.0
        self._engine: Engine[str] = Engine(self.policies, 0.0)
        self._reaps = self._engine.reaps
        self._reaps.next = 0.0  # the first operation reaps if no process has lately
        self._root_fd = -1
        self._tmp_fd = -1  # the current fd of _dirs["tmp"] (-1: none)
        self._writer_lock: _WriterLock | None = None
        self._blobs_fd = -1  # the current fd of _dirs["blobs"] (-1: none)
        # cached fds of "tmp", "blobs" and "blobs/<algorithm>" (see _dir_fd)
        self._dirs: dict[str, int] = {}
        # cached fds of shard directories "blobs/<algorithm>/<xx>", bounded
        self._shards: OrderedDict[str, int] = OrderedDict()
        self._shard_cap = _shard_cap()
        self._read_only = False
        # read-only handles hold leases in this process only: (cid, lid) -> expiry
        self._local_leases: dict[tuple[str, str], float | None] = {}
        self._finalizer: weakref.finalize[Any, DirectoryStorage] | None = None
        self._reserve_missing = False
        # one hashing thread per handle and process, started on first use
        self._hasher_pool: ThreadPoolExecutor | None = None
        # Freed blob files kept for new blobs (file_pool), None: unlinked.
        self._file_pool: file_pool.FilePool | None = None
        self._hasher_pid = 0
        self._hasher_busy = threading.Lock()
        try:
            self._open_root(create=create, rebuild=rebuild)
            try:
                self._open_index(rebuild=rebuild)
            except StorageError as exc:
                if _is_busy(exc):
                    timeout = self.policies.lock_timeout
                    raise StorageError(
                        f"{exc} (waited {timeout:g} s: {self._index_holders()})"
                    ) from exc.__cause__
                if self._read_only or not _is_full(exc) or not self._release_reserve():
                    raise
                self._open_index(rebuild=rebuild)
        except BaseException:
            self._close_fds()
            raise
        forksafe.register(self, lock=_fork_lock, child=DirectoryStorage._after_fork)
        # At exit, after the leases made on this handle (finalizers run
        # newest first) have been dropped.
        weakref.finalize(self, _finish_at_exit, weakref.ref(self))
        if not self._read_only:
            self._ensure_reserve()

    def _open_root(self, *, create: bool, rebuild: bool) -> None:
        """Open the root and check everything in it before anything is
        created: a refused open creates nothing."""
        root = self._root
        try:
            st: os.stat_result | None = os.stat(root)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise _error(f"cannot open store root {root!r}", exc) from exc
        if st is None:
            if not create:
                raise StorageError(f"no blobleases store at {root!r}: the directory does not exist")
            try:
                os.makedirs(root, mode=0o700, exist_ok=True)
                st = os.stat(root)
                if stat_module.S_IMODE(st.st_mode) != 0o700 and st.st_uid == os.geteuid():
                    os.chmod(root, 0o700)
                    st = os.stat(root)
            except OSError as exc:
                raise _error(f"cannot create store root {root!r}", exc) from exc
        _check_dir_stat(st, root)
        try:
            self._root_fd = os.open(root, _O_DIR)
        except OSError as exc:
            raise _error(f"cannot open store root {root!r}", exc) from exc
        try:
            index = self._inspect_root(create=create, rebuild=rebuild)
            st = os.fstat(self._root_fd)
            self._root_key = (st.st_dev, st.st_ino)
            if self._read_only:
                self._dir_fd("blobs", create=False)
                self._dir_fd("tmp", create=False)
                if self._lstat(self._root_fd, "owners") is not None:
                    self._owners_fd = self._subdir(self._root_fd, "owners", "owners", create=False)
                return
            if index is None:
                # the index first: a directory holding it is a store, so an
                # interrupted creation is completed by the next open
                if rebuild:
                    for stale in (_INDEX + "-wal", _INDEX + "-shm", _INDEX + "-journal"):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(stale, dir_fd=self._root_fd)
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(_INDEX, _O_TMP, 0o600, dir_fd=self._root_fd))
            self._dir_fd("blobs", create=True)
            self._dir_fd("tmp", create=True)
            self._owners_fd = self._subdir(self._root_fd, "owners", "owners", create=True)
        except OSError as exc:
            raise _error(f"cannot open the store in {root!r}", exc) from exc

    def _subdir(self, parent: int, name: str, shown: str, *, create: bool) -> int:
        """Open (creating if asked) directory ``name`` under ``parent``
        without following a symlink; StorageError if it is not ours."""
        if create and self._lstat(parent, name) is None:
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
                if self._safe:
                    os.fsync(parent)
            except FileExistsError:
                pass
            except OSError as exc:
                raise _error(f"cannot create {os.path.join(self._root, shown)!r}", exc) from exc
        try:
            fd = os.open(name, _O_DIR, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise StorageError(
                    f"refusing {os.path.join(self._root, shown)!r}: it is a symlink or not "
                    "a directory"
                ) from exc
            raise
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            os.close(fd)
            raise StorageError(
                f"refusing {os.path.join(self._root, shown)!r}: owned by another user or "
                "writable by group or others"
            )
        return fd

    def _inspect_root(self, *, create: bool, rebuild: bool) -> os.stat_result | None:
        """Refuse a root that does not hold a store (unless it is empty and
        ``create``), or whose entries are not what a store's are; decide
        whether the handle is read-only. Returns the index's stat (None if
        there is no index). Creates nothing."""
        root, fd = self._root, self._root_fd
        marker = self._lstat(fd, _MARKER)
        index = self._lstat(fd, _INDEX)
        if marker is None and index is None:
            if os.listdir(fd):
                raise StorageError(
                    f"refusing {root!r}: the directory is not empty and holds no blobleases "
                    f"store (no {_MARKER!r} or {_INDEX!r} file); a store is created only in "
                    "a missing or empty directory"
                )
            if not create:
                raise StorageError(f"no blobleases store at {root!r}: the directory is empty")
        if marker is not None:
            text = b""
            if stat_module.S_ISREG(marker.st_mode):
                with contextlib.suppress(OSError):
                    mfd = os.open(_MARKER, _O_READ, dir_fd=fd)
                    try:
                        text = os.read(mfd, len(_MARKER_TEXT) + 1)
                    finally:
                        os.close(mfd)
            if text != _MARKER_TEXT:
                raise StorageError(
                    f"refusing {root!r}: its {_MARKER!r} file does not mark a blobleases store "
                    "of a format this version knows"
                )
        for name in ("blobs", "tmp", "owners"):
            st = self._lstat(fd, name)
            if st is not None and (
                not stat_module.S_ISDIR(st.st_mode)
                or st.st_uid != os.geteuid()
                or st.st_mode & 0o022
            ):
                raise StorageError(
                    f"refusing {os.path.join(root, name)!r}: it is a symlink or not a "
                    "directory, owned by another user, or writable by group or others"
                )
        if index is not None and not stat_module.S_ISREG(index.st_mode):
            raise StorageError(
                f"refusing the index {self._index_path!r}: it is not a regular file (a symlink?)"
            )
        if index is None and marker is not None and not rebuild:
            raise StorageError(
                f"the index {self._index_path!r} is missing although {root!r} holds "
                "a blobleases store (was it deleted?); refusing to open it, since every "
                "lease it recorded would be lost silently. To rebuild the index from "
                "the blob files (as unreferenced content), call "
                "DirectoryStorage.rebuild_index(path); or remove the directory."
            )
        if not _writable(root) or (index is not None and not os.access(self._index_path, os.W_OK)):
            if index is None or rebuild:
                raise StorageError(
                    f"store root {root!r} is not writable (read-only filesystem or "
                    f"permissions): cannot {'rebuild its index' if rebuild else 'create a store'}"
                )
            self._read_only = True
            self._reaps.never()  # a read-only handle never reaps
        return index

    def _connect_index(self) -> sqlite3.Connection:
        """A new connection to the index, as this handle opens it."""
        return connect(
            self._index_path,
            safe=self._safe,
            read_only=self._read_only,
            timeout=self.policies.lock_timeout,
        )

    def _open_index(self, *, rebuild: bool) -> None:
        try:
            db = self._connect_index()
            try:
                if self._read_only:
                    check_schema(db)
                else:
                    # under the writer lock, as every write: waiting in SQLite's
                    # busy handler instead, beside busy writers, can take longer
                    # than lock_timeout (it polls)
                    writer = self._writer()
                    writer.enter(self.policies.lock_timeout)
                    try:
                        create_schema(db, self._scope)
                    finally:
                        writer.exit()
            except BaseException:
                db.close()
                raise
            if not self._read_only and self._lstat(self._root_fd, _MARKER) is None:
                try:
                    fd = os.open(_MARKER, _O_TMP, 0o600, dir_fd=self._root_fd)
                except FileExistsError:
                    pass
                else:
                    with contextlib.closing(os.fdopen(fd, "wb")) as f:
                        f.write(_MARKER_TEXT)
        except sqlite3.Error as exc:
            raise _error(f"cannot open the index {self._index_path!r}", exc) from exc
        except OSError as exc:
            raise _error(f"cannot open the index in {self._root!r}", exc) from exc
        self._db = db
        self._db_pid = os.getpid()
        self._mypid = self._db_pid
        self._mystart = own_start_time()

    @property
    def read_only(self) -> bool:
        """True when this handle opened the store read-only (its root or
        index is not writable here): it lists, reads and verifies; every
        change raises StorageError. Its leases and readers are held in this
        process only (nothing can be recorded in the store)."""
        return self._read_only

    @staticmethod
    def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    @classmethod
    def temporary(cls, **policies: Any) -> DirectoryStorage:
        """A store in a new private temporary directory, removed (with every
        blob) on ``close()``, garbage collection or interpreter exit of the
        creating process. Its ``url`` opens it from other processes while it
        exists."""
        root = tempfile.mkdtemp(prefix="blobleases-")
        try:
            storage = cls(root, **policies)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        storage._temporary = True
        storage._finalizer = weakref.finalize(storage, _remove_tree, root, os.getpid())
        return storage

    @classmethod
    def shared_memory(cls, name: str, *, create: bool = True, **policies: Any) -> DirectoryStorage:
        """The store ``name`` on tmpfs (``/dev/shm/blobleases-<uid>/<name>``):
        RAM-backed, shared by every process of this user, gone at reboot.
        Its url is ``shm://<name>``. ``create`` as for the constructor."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        if not _SHM_NAME.fullmatch(name):
            raise ValueError(
                f"name {name!r} must be letters, digits, '.', '_' and '-' (at most 128)"
            )
        if not os.path.isdir(_SHM_BASE):
            raise StorageError(f"shared memory stores need {_SHM_BASE} (a tmpfs), not found")
        base = os.path.join(_SHM_BASE, f"blobleases-{os.geteuid()}")
        if not create and not os.path.lexists(base):
            raise StorageError(f"no blobleases store at {os.path.join(base, name)!r}")
        try:
            os.mkdir(base, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise _error(f"cannot create {base!r}", exc) from exc
        try:
            st = os.stat(base, follow_symlinks=False)
        except OSError as exc:
            raise _error(f"cannot open {base!r}", exc) from exc
        if stat_module.S_ISLNK(st.st_mode):
            raise StorageError(f"refusing {base!r}: it is a symlink")
        _check_dir_stat(st, base)
        storage = cls(os.path.join(base, name), create=create, **policies)
        storage._url = f"shm://{name}"
        return storage

    @classmethod
    def rebuild_index(cls, path: str | os.PathLike[str], **policies: Any) -> DirectoryStorage:
        """Rebuild a deleted index from the blob files and open the store.

        Only while no other process uses the store. Every blob file is
        rehashed; those that match their name are indexed as unreferenced
        content (leases are not recoverable: lease what you need before the
        next ``collect()``, which keeps only ``retain_bytes`` of it); the
        others are removed."""
        storage = cls.__new__(cls)
        BlobStorage.__init__(storage, **policies)
        storage._setup(path, rebuild=True)
        candidates = storage._scan_blob_files()
        with storage._write(maintain=False) as tx:
            seq = 0
            for alg, shard, name in candidates:
                if not _HEX64.fullmatch(name) or name[:2] != shard:
                    continue
                cid = ContentId(alg, bytes.fromhex(name))
                key = str(cid)
                if tx.db.execute("SELECT 1 FROM content WHERE cid = ?", (key,)).fetchone():
                    continue
                size = storage._check_file(cid, None)
                if size is None:
                    continue
                seq += 1
                tx.db.execute(
                    "INSERT INTO content(cid, size, created, last_access, retained) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (key, size, tx.now, tx.now, seq),
                )
        storage._remove_orphans(repair=True)
        return storage

    # -- identity ------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._url

    @property
    def root(self) -> Path:
        """The store's root directory."""
        return Path(self._root)

    def blob_path(self, content_id: ContentId) -> Path:
        """Where the bytes of ``content_id`` live (whether or not present)."""
        if not isinstance(content_id, ContentId):
            raise TypeError(f"content_id must be a ContentId, not {type(content_id).__name__}")
        hexid = content_id.hex
        return Path(self._root, "blobs", content_id.algorithm, hexid[:2], hexid)

    # -- connection, fork, transactions --------------------------------------------------

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock, and the inherited connection closed."""
        self._lock = threading.RLock()
        # the parent's hashing thread does not exist here (never shut it down)
        self._hasher_pool, self._hasher_pid = None, 0
        self._hasher_busy = threading.Lock()
        self._owner_lock, self._owner, self._owner_recorded = None, "", False
        self._scope = pid_scope()
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                _INHERITED.append(db)
        self._access = {}

    def _conn(self) -> sqlite3.Connection:
        """This process's connection (call with the lock held)."""
        if self._closed:
            raise StorageError(f"the storage {self._url} is closed")
        pid = os.getpid()
        db = self._db
        if db is not None and self._db_pid == pid:
            return db
        if db is not None:
            _INHERITED.append(db)
            self._db = None
        try:
            db = self._connect_index()
        except sqlite3.Error as exc:
            raise _error(f"cannot open the index {self._index_path!r}", exc) from exc
        self._db, self._db_pid, self._mypid = db, pid, pid
        self._mystart = own_start_time()
        self._owner_lock, self._owner, self._owner_recorded = None, "", False
        self._scope = pid_scope()
        self._access = {}
        return db

    def _op(self) -> sqlite3.Connection:
        """Start an operation (lock held): the connection, after an automatic
        reap if one is due."""
        db = self._conn()
        if self._reaps.due(time.time()):
            self._auto_reap()
        return db

    @contextlib.contextmanager
    def _write(
        self, *, maintain: bool = True, expire: bool = True, flush: bool = False
    ) -> Iterator[_Tx]:
        """A ``BEGIN IMMEDIATE`` transaction; ends expired leases first (if
        ``expire``) and writes recorded accesses (if ``flush`` or due). Blob
        files of content deleted in it are unlinked after it commits."""
        with self._lock:
            tx = self._begin(maintain=maintain, expire=expire, flush=flush)
            try:
                yield tx
            except BaseException as exc:
                self._abort(tx, exc)
            self._commit(tx)

    def _begin(self, *, maintain: bool = True, expire: bool = True, flush: bool = False) -> _Tx:
        """Start a write transaction (call with the lock held; end it with
        :meth:`_commit` or :meth:`_abort`)."""
        db = self._conn()
        if self._read_only:
            self._refuse_read_only("change it")
        if maintain and self._reaps.due(time.time()):
            self._auto_reap()
        # _conn() checked that this process owns the connection: a writer
        # lock made by this process is ours too (no second getpid).
        writer = self._writer_lock
        if writer is None or writer.pid != self._db_pid:
            writer = self._writer()
        self._lock_index(db, writer)
        tx = _Tx(db, time.time(), writer)
        try:
            if self._access and (
                flush
                or len(self._access) >= _ACCESS_FLUSH_ENTRIES
                or time.monotonic() >= self._access_flush_at
            ):
                self._flush_access(tx)
            if expire and db.execute(_SQL_EXPIRED, (tx.now,)).fetchone() is not None:
                self._expire(tx)
        except BaseException as exc:
            self._abort(tx, exc)
        return tx

    def _lock_index(self, db: sqlite3.Connection, writer: _WriterLock) -> None:
        """Take the writer lock and begin a write transaction, each wait
        bounded by ``lock_timeout`` (StorageError naming the holder)."""
        timeout = self.policies.lock_timeout
        writer.enter(timeout)
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            writer.exit()
            detail = ""
            if _is_busy(exc):
                detail = f" (waited {timeout:g} s: {self._index_holders()})"
            raise _error(f"cannot lock the index {self._index_path!r}{detail}", exc) from exc

    def _index_holders(self) -> str:
        """Who holds the index's write lock (SQLite's WAL write lock is a
        POSIX lock on byte 120 of the ``-shm`` file)."""
        try:
            fd = os.open(_INDEX + "-shm", _O_READ, dir_fd=self._root_fd)
        except OSError:
            return "held by another process (its pid is not known here)"
        try:
            return _holders_text([fd], flock=False, start=_WAL_WRITE_LOCK)
        finally:
            os.close(fd)

    def _commit(self, tx: _Tx) -> None:
        try:
            tx.db.execute("COMMIT")
        except BaseException as exc:
            self._abort(tx, exc)
        try:
            if tx.doomed:
                self._unlink_doomed(tx, tx.writer.epoch)
            for token in tx.dead_owners:  # their rows are gone: now their lock files
                remove_dead_owner(self._owners_fd, token)
        finally:
            tx.held = False
            tx.writer.exit()

    def _maybe_slice(self, tx: _Tx) -> None:
        """In a long piece of work (collect, repair, reaping many leases):
        once ``tx`` has been open ``_SLICE_SECONDS``, commit what it did,
        let the writer lock go for a moment and begin again, so that other
        processes wait for it only a few milliseconds at a time. Each slice
        leaves the index consistent (rows deleted with their content
        settled); ``tx`` keeps its clock and its counts."""
        now = time.monotonic()
        if now < tx.slice_at:
            return
        if not tx.slice_at:  # the first check: the slice began about now
            tx.slice_at = now + _SLICE_SECONDS
            return
        self._commit(tx)
        tx.doomed.clear()
        tx.flushed.clear()
        tx.known = None
        # a process woken by the release must get a chance to take the lock
        time.sleep(_SLICE_PAUSE)
        self._lock_index(tx.db, tx.writer)
        tx.held = True
        tx.slice_at = time.monotonic() + _SLICE_SECONDS

    def _unlink_doomed(self, tx: _Tx, epoch: int) -> None:
        """Unlink the files of content that ``tx``, just committed, deleted.

        Called before ``tx`` releases its writer lock: every writer of every
        process takes that lock before ``BEGIN IMMEDIATE``, and other
        threads of this process wait for it, so no row can have named one of
        these files since the commit (content deleted and added again in
        ``tx`` itself left ``doomed``: see :meth:`_add_content`). Only this
        thread could have written meanwhile, through another handle (a
        finalizer, a signal handler): then the writer lock's ``epoch`` moved
        on from ``epoch`` (its value at the commit), and the rest are
        checked against the index as :meth:`_unlink_unreferenced` does. A
        failure leaves orphans, which collect() removes."""
        keys = list(dict.fromkeys(tx.doomed))
        for i, key in enumerate(keys):
            if tx.writer.epoch != epoch:
                self._unlink_unreferenced(tx.db, keys[i:])
                return
            try:
                known = tx.known
                cid = known if known is not None and str(known) == key else ContentId.parse(key)
                self._unlink_blob(cid)
            except (OSError, ValueError, StorageError):
                pass

    def _abort(self, tx: _Tx, exc: BaseException) -> NoReturn:
        """Roll ``tx`` back and raise ``exc`` (OS and SQLite errors as StorageError)."""
        if not tx.held:  # a slice boundary failed: nothing is open any more
            raise exc
        if tx.db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                tx.db.execute("ROLLBACK")
        self._owner_recorded = False  # its row may have been rolled back
        tx.held = False
        tx.writer.exit()
        for t, k in tx.flushed:  # rolled back: record them again
            self._access[k] = max(t, self._access.get(k, t))
        if isinstance(exc, sqlite3.Error):
            raise self._index_error(exc) from exc
        if isinstance(exc, OSError):
            raise _error(f"file operation failed in {self._root!r}", exc) from exc
        raise exc

    def _index_error(self, exc: BaseException) -> StorageError:
        """StorageError for an error that came out of the index."""
        text = str(exc) or type(exc).__name__
        if isinstance(exc, sqlite3.OperationalError) and "decode" not in text:
            return StorageError(f"index operation failed on {self._index_path!r}: {text}")
        return StorageError(
            f"the index {self._index_path!r} is corrupted: {text} (verify() reports it; "
            "move it away and call DirectoryStorage.rebuild_index to index the blob files again)"
        )

    def _unlink_unreferenced(self, db: sqlite3.Connection, keys: list[str]) -> None:
        """Unlink the files of ``keys`` that no row names, under the write lock
        (so a store that re-created one meanwhile keeps its file). A failure
        leaves orphans, which collect() removes."""
        try:
            writer = self._writer()
            writer.enter(self.policies.lock_timeout)
        except StorageError:
            return
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:
            writer.exit()
            return
        try:
            for key in dict.fromkeys(keys):
                if db.execute("SELECT 1 FROM content WHERE cid = ?", (key,)).fetchone():
                    continue
                with contextlib.suppress(FileNotFoundError):
                    self._unlink_blob(ContentId.parse(key))
        except (OSError, sqlite3.Error, StorageError):
            pass
        finally:
            with contextlib.suppress(sqlite3.Error):
                db.execute("COMMIT")
            writer.exit()

    def _unlink_blob(self, cid: ContentId) -> None:
        """Unlink ``cid``'s file, or move it into this handle's file pool
        (FileNotFoundError if there is none)."""
        name = cid.hex
        pool = self._file_pool
        if pool is not None:
            token = self._owner_token()
            if self._in_shard(
                cid,
                lambda shard: self._in_tmp(
                    lambda tmp: file_pool.keep(pool, shard, name, tmp, token)
                ),
            ):
                return
        self._in_shard(cid, lambda shard: os.unlink(name, dir_fd=shard))

    def _use_file_pool(self, max_files: int = 16, max_bytes: int = 128 << 20) -> None:
        """Keep up to ``max_files`` freed blob files (``max_bytes`` in all)
        in ``tmp/`` and write new blobs into them (see :mod:`file_pool`):
        for stores on tmpfs, where fresh pages cost more than the copy. The
        pool's bytes are not content: ``stats()`` and ``max_bytes`` do not
        count them."""
        self._file_pool = file_pool.FilePool(max_files, max_bytes)

    def _writer(self) -> _WriterLock:
        """This process's writer lock of this store (shared by its handles)."""
        writer = self._writer_lock
        if writer is None or writer.pid != os.getpid():
            writer = _WriterLock.of(self._root, self._root_fd)
            self._writer_lock = writer
        return writer

    def _flush_access(self, tx: _Tx) -> None:
        """Write the accesses recorded in this process (LRU order), in ``tx``."""
        if not self._access:
            return
        items = [(t, k) for k, t in self._access.items()]
        self._access.clear()
        tx.flushed.extend(items)
        self._access_flush_at = time.monotonic() + _ACCESS_FLUSH_SECONDS
        tx.db.executemany(
            "UPDATE content SET last_access = max(last_access, ?) WHERE cid = ?", items
        )

    def _touch(self, key: str, now: float) -> None:
        """Record an access for LRU, written to the index in batches."""
        if self._read_only:
            return
        self._access[key] = now
        if len(self._access) >= _ACCESS_FLUSH_ENTRIES or time.monotonic() >= self._access_flush_at:
            with self._write(maintain=False, expire=False, flush=True):
                pass

    # -- the reserve ------------------------------------------------------------------

    def _ensure_reserve(self) -> None:
        """Make ``<root>/reserve`` if it is missing (best effort: on a full
        filesystem it is tried again after the next work that frees)."""
        self._reserve_missing = True
        if self._closed or self._root_fd < 0 or self._read_only:
            return
        if self._lstat(self._root_fd, _RESERVE) is not None:
            self._reserve_missing = False
            return
        try:
            st = os.fstatvfs(self._root_fd)
            size = min(_RESERVE_MAX, max(_RESERVE_MIN, st.f_blocks * st.f_frsize // 16))
            name, fd = self._open_temp()
        except (OSError, StorageError):
            return
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                _write_all(fd, memoryview(bytes(size)))  # no fallocate here
            os.replace(name, _RESERVE, src_dir_fd=self._tmp_fd, dst_dir_fd=self._root_fd)
            self._reserve_missing = False
        except OSError:
            self._discard_temp(name)
        finally:
            os.close(fd)

    def _release_reserve(self) -> bool:
        """Give the reserve back to the filesystem (False if there is none)
        and checkpoint the index, so that what follows fits."""
        try:
            os.unlink(_RESERVE, dir_fd=self._root_fd)
        except OSError:
            return False
        self._reserve_missing = True
        with self._lock:
            db = self._db
            if db is not None and self._db_pid == os.getpid() and not db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        return True

    # -- directories and files --------------------------------------------------------

    def _dir_fd(self, rel: str, *, create: bool, check: bool = False) -> int | None:
        """The cached fd of directory ``rel`` (``tmp``, ``blobs`` or
        ``blobs/<algorithm>``), opened component by component from the root
        without following a symlink; None if it does not exist and not
        ``create``. With ``check``, a cached fd is first checked to still be
        the directory at that path (it was not removed or replaced); if not,
        it and those below it are closed and the path is opened again (and
        re-created if ``create``). Takes the lock: cached fds are closed
        only under it."""
        with self._lock:
            fd = self._dirs.get(rel)
            if fd is not None:
                if not check or self._current(rel, fd):
                    return fd
                self._forget(rel)
            parent_rel, _, name = rel.rpartition("/")
            parent = (
                self._dir_fd(parent_rel, create=create, check=check)
                if parent_rel
                else self._root_fd
            )
            if parent is None:
                return None
            fresh = self._lstat(parent, name) is None
            if fresh and not create:
                return None
            fd = self._subdir(parent, name, rel, create=True)
            self._dirs[rel] = fd
            if rel == "tmp":
                self._tmp_fd = fd
            elif rel == "blobs":
                self._blobs_fd = fd
            elif fresh:
                self._make_shards(fd)
            return fd

    def _current(self, rel: str, fd: int) -> bool:
        """Whether ``fd`` is still the directory at ``rel`` under the root."""
        try:
            held = os.fstat(fd)
            if held.st_nlink == 0:
                return False  # removed
            now = os.stat(rel, dir_fd=self._root_fd, follow_symlinks=False)
        except OSError:
            return False
        return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)

    def _forget(self, rel: str) -> None:
        """Close the cached fds of ``rel`` and of every directory below it
        (lock held)."""
        for key in [k for k in self._shards if k == rel or k.startswith(rel + "/")]:
            with contextlib.suppress(OSError):
                os.close(self._shards.pop(key))
        for key in [k for k in self._dirs if k == rel or k.startswith(rel + "/")]:
            fd = self._dirs.pop(key)
            if key == "tmp":
                self._tmp_fd = -1
            elif key == "blobs":
                self._blobs_fd = -1
            with contextlib.suppress(OSError):
                os.close(fd)

    def _shard_dir(self, cid: ContentId, *, create: bool, check: bool) -> int | None:
        """The cached fd of ``cid``'s shard directory (lock held; at most
        ``_shard_cap`` are kept, least recently used closed first); None if
        it does not exist and not ``create``. ``check`` as for _dir_fd."""
        rel = f"blobs/{cid.algorithm}/{cid.hex[:2]}"
        shards = self._shards
        fd = shards.get(rel)
        if fd is not None:
            if not check or self._current(rel, fd):
                shards.move_to_end(rel)
                return fd
            self._forget(rel)
        alg = self._dir_fd("blobs/" + cid.algorithm, create=create, check=check)
        if alg is None:
            return None
        name = cid.hex[:2]
        try:
            fd = self._open_dir_at(alg, name)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not shards:
                raise
            for old in shards.values():  # out of descriptors: give ours back
                with contextlib.suppress(OSError):
                    os.close(old)
            shards.clear()
            fd = self._open_dir_at(alg, name)
        if fd is None:
            if not create:
                return None
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=alg)
            fd = os.open(name, _O_DIR, dir_fd=alg)
        shards[rel] = fd
        while len(shards) > self._shard_cap:
            _, old = shards.popitem(last=False)
            with contextlib.suppress(OSError):
                os.close(old)
        return fd

    @staticmethod
    def _open_dir_at(parent: int, name: str) -> int | None:
        try:
            return os.open(name, _O_DIR, dir_fd=parent)
        except FileNotFoundError:
            return None

    def _in_shard(
        self,
        cid: ContentId,
        action: Callable[[int], _T],
        *,
        create: bool = False,
        check: bool = False,
    ) -> _T:
        """``action(fd)`` with the fd of ``cid``'s shard directory, under
        the lock (cached fds are closed only under it). FileNotFoundError
        (from a missing directory, or from ``action``) is raised only after
        a second try through fresh path look-ups: a directory this handle
        holds may have been removed or replaced behind its back, and what
        another process stored since is under the new one. ``check``: look
        the path up first (for a store, whose file others must find)."""
        with self._lock:
            if not check:
                rel = f"blobs/{cid.algorithm}/{cid.hex[:2]}"
                cached = self._shards.get(rel)
                if cached is not None:
                    self._shards.move_to_end(rel)
                    try:
                        return action(cached)
                    except FileNotFoundError:
                        check = True  # look the path up again
            for fresh in (False, True) if not check else (True,):
                try:
                    shard = self._shard_dir(cid, create=create, check=fresh)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise StorageError(
                            f"refusing the blob directory of {cid} in {self._root!r}: it is "
                            "a symlink or not a directory"
                        ) from exc
                    raise _error(f"cannot open the blob directory of {cid}", exc) from exc
                if shard is None:
                    if fresh:
                        raise FileNotFoundError(errno.ENOENT, f"no blob directory for {cid}")
                    continue
                try:
                    return action(shard)
                except FileNotFoundError:
                    if fresh:
                        raise
            raise AssertionError("unreachable")

    def _in_tmp(self, action: Callable[[int], _T], *, create: bool = True) -> _T:
        """``action(fd)`` with the fd of ``tmp/`` (lock held while it runs);
        retried once through a fresh look-up (re-creating ``tmp/``) if it
        raises FileNotFoundError."""
        with self._lock:
            for fresh in (False, True):
                fd = self._dir_fd("tmp", create=create, check=fresh)
                if fd is None:
                    raise FileNotFoundError(errno.ENOENT, "no tmp directory")
                try:
                    return action(fd)
                except FileNotFoundError:
                    if fresh:
                        raise
            raise AssertionError("unreachable")

    def _make_shards(self, alg_fd: int) -> None:
        """Create the 256 shard directories of a new algorithm directory at
        once: creating them one by one would cost the first few hundred
        stores a directory creation each."""
        for i in range(256):
            with contextlib.suppress(FileExistsError):
                os.mkdir(f"{i:02x}", 0o700, dir_fd=alg_fd)
        if self._safe:
            os.fsync(alg_fd)

    def _owner_token(self) -> str:
        """This process's owner token in this store, its lock file created
        and locked first (before any row or temporary file names it)."""
        lock = self._owner_lock
        if lock is not None and lock.pid == os.getpid():
            return lock.token
        with self._lock:
            lock = self._owner_lock
            if lock is None or lock.pid != os.getpid():
                if self._closed:
                    raise StorageError(f"the storage {self._url} is closed")
                try:
                    lock = OwnerLock.acquire(self._root_key, self._owners_fd)
                except OSError as exc:
                    raise _error(
                        f"cannot create this process's owner lock in {self._root!r}/owners", exc
                    ) from exc
                self._owner_lock, self._owner, self._owner_recorded = lock, lock.token, False
            return lock.token

    def _own_owner(self, db: sqlite3.Connection) -> str:
        """This process's owner, its owners row recorded (inside a write transaction)."""
        owner = self._owner
        if owner and self._owner_recorded:
            return owner
        owner = self._owner_token()
        db.execute(_SQL_ADD_OWNER, (owner, self._mypid, self._mystart, self._scope))
        self._owner_recorded = True
        return owner

    def _release_owner(self) -> None:
        """On close: let go of this process's owner lock; the last handle of
        the process removes it when no row of a lease or hold names it (else
        it stays, so they live as long as the process)."""
        lock = self._owner_lock
        if lock is None or lock.pid != os.getpid():
            return
        self._owner_lock = None
        generation = lock.release()
        if lock.users > 0:
            return
        token = lock.token
        with self._write(maintain=False, expire=False) as tx:
            db = tx.db
            if (
                db.execute(
                    "SELECT 1 FROM leases WHERE owner = ? AND detached = 0 LIMIT 1", (token,)
                ).fetchone()
                or db.execute("SELECT 1 FROM holds WHERE owner = ? LIMIT 1", (token,)).fetchone()
            ):
                return
            db.execute("DELETE FROM owners WHERE owner = ?", (token,))
        lock.drop(self._owners_fd, generation)

    def _check_owners_dir(self) -> None:
        """Before judging owners by their lock files: reopen ``owners/`` if
        it was removed or replaced behind our back (a stale descriptor would
        show every owner missing), and put this process's own lock file back
        if it is gone (others would take this process for dead)."""
        try:
            current = self._lstat(self._root_fd, "owners")
            st = os.fstat(self._owners_fd)
            if current is None or (current.st_dev, current.st_ino) != (st.st_dev, st.st_ino):
                fd = self._subdir(self._root_fd, "owners", "owners", create=True)
                old, self._owners_fd = self._owners_fd, fd
                os.close(old)
            lock = self._owner_lock
            if lock is not None and lock.pid == os.getpid():
                lock.ensure_linked(self._owners_fd)
        except OSError as exc:
            raise _error(f"cannot open {self._root!r}/owners", exc) from exc

    def _temp_name(self) -> str:
        return f"{self._owner_token()}-{file_pool.temp_suffix()}.tmp"

    def _open_temp(self, size: int = 0) -> tuple[str, int]:
        """A new temporary file for a blob of ``size`` bytes (0: unknown),
        open for writing: a file from the pool if this handle has one."""
        if self._read_only:
            self._refuse_read_only("store")
        name = self._temp_name()
        pool = self._file_pool
        try:
            if pool is not None and size >= file_pool.POOL_MIN:
                fd = self._in_tmp(lambda tmp: file_pool.claim(tmp, size, name))
                if fd is not None:
                    return name, fd
            return name, self._in_tmp(lambda tmp: os.open(name, _O_TMP, 0o600, dir_fd=tmp))
        except OSError as exc:
            raise _error(f"cannot create a temporary file in {self._root!r}/tmp", exc) from exc

    def _discard_temp(self, name: str) -> None:
        with contextlib.suppress(OSError), self._lock:
            os.unlink(name, dir_fd=self._tmp_fd)

    def _refuse_read_only(self, what: str) -> NoReturn:
        raise StorageError(
            f"the store {self._root!r} is read-only (read-only filesystem or permissions): "
            f"cannot {what}"
        )

    def _write_temp(self, data: memoryview) -> str:
        name, fd = self._open_temp(data.nbytes)
        try:
            _write_all(fd, data)
            if self._safe:
                os.fsync(fd)
        except BaseException as exc:
            os.close(fd)
            self._discard_temp(name)
            if isinstance(exc, OSError):
                raise _error(f"cannot write a blob in {self._root!r}", exc) from exc
            raise
        os.close(fd)
        return name

    def _open_blob(self, cid: ContentId, lid: LeaseId | None, size: int) -> int:
        """An open fd on ``cid``'s file, checked to be a regular file of
        ``size`` bytes. Missing file: LeaseExpired if the lease went
        meanwhile, else IntegrityError; a symlink or wrong size: IntegrityError."""
        try:
            fd = self._in_shard(cid, lambda shard: os.open(cid.hex, _O_READ, dir_fd=shard))
        except FileNotFoundError as exc:
            if lid is not None and not self._is_held(cid, lid):
                raise self._lease_expired(cid, lid) from None
            raise IntegrityError(f"the file of blob {cid} is missing") from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise IntegrityError(
                    f"the file of blob {cid} is a symlink: refusing to follow it"
                ) from exc
            raise _error(f"cannot open the file of blob {cid}", exc) from exc
        try:
            st = os.fstat(fd)
            if not stat_module.S_ISREG(st.st_mode):
                raise IntegrityError(f"the file of blob {cid} is not a regular file")
            if st.st_size != size:
                raise IntegrityError(
                    f"the file of blob {cid} holds {st.st_size} bytes, not its {size}"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_file(self, cid: ContentId, size: int | None) -> int | None:
        """Rehash ``cid``'s file: its size if it is intact (and of ``size``
        when given), else None. FileNotFoundError if it is missing."""
        try:
            fd = self._in_shard(cid, lambda shard: os.open(cid.hex, _O_READ, dir_fd=shard))
        except FileNotFoundError:
            raise
        except OSError:
            return None  # a symlink, or unreadable: not intact
        try:
            st = os.fstat(fd)
            if not stat_module.S_ISREG(st.st_mode):
                return None
            if size is not None and st.st_size != size:
                return None
            hasher = new_hasher(cid.algorithm)
            with open(fd, "rb", buffering=0, closefd=False) as f:
                total = ingest.copy(f, hasher)
            if hasher.digest() != cid.digest or total != st.st_size:
                return None
            return total
        finally:
            os.close(fd)

    # -- index helpers (inside a write transaction) -------------------------------------

    def _start_of(self, db: sqlite3.Connection, pid: int, now: float) -> float:
        """The start time to record for leases of another ``pid`` (of this
        process's pid namespace); 0.0 if unknown."""
        row = db.execute(
            "SELECT start FROM processes WHERE scope = ? AND pid = ?", (self._scope, pid)
        ).fetchone()
        if row is not None:
            return float(row[0])
        if not can_judge_pids():
            return 0.0  # /proc shows another pid namespace: cannot be known
        start = process_start_time(pid)
        if start is None:
            return 0.0  # dead already: the next reap ends its leases
        db.execute(
            "INSERT OR REPLACE INTO processes(scope, pid, start, seen) VALUES (?, ?, ?, ?)",
            (self._scope, pid, start, now),
        )
        return start

    def _hold(
        self,
        tx: _Tx,
        key: str,
        lid: LeaseId,
        ttl: float | None,
        detached: bool,
        *,
        first: bool = False,
    ) -> tuple[int | None, bool]:
        """Hold ``(lid, key)``: (the size or None if absent, whether it is
        new). ``first``: the content row was just inserted in ``tx``."""
        db = tx.db
        pid = lid.pid
        if pid == self._mypid:
            owner = self._owner if self._owner_recorded else self._own_owner(db)
            start = self._mystart
        else:
            start = 0.0 if detached else self._start_of(db, pid, tx.now)
            owner = pid_owner(pid, start, self._scope)
            if not detached:
                db.execute(_SQL_ADD_OWNER, (owner, pid, start, self._scope))
        expires = policy_rules.expires_at(ttl, tx.now)
        lkey = str(lid)
        if first:
            db.execute(
                _SQL_INSERT_FIRST_LEASE,
                (key, lkey, pid, start, expires, int(detached), owner, tx.now),
            )
            inserted = 1
        else:
            inserted = db.execute(
                _SQL_INSERT_LEASE,
                {
                    "cid": key,
                    "lid": lkey,
                    "pid": pid,
                    "start": start,
                    "expires": expires,
                    "detached": int(detached),
                    "now": tx.now,
                    "owner": owner,
                },
            ).rowcount
        size = self._sizes.get(key)
        if inserted <= 0 or size is None:
            row = db.execute(_SQL_CONTENT, (key,)).fetchone()
            if row is None:
                return None, False
            size = int(row[0])
            self._cache_size(key, size)
            if inserted <= 0:
                held = db.execute(_SQL_HELD, (key, lkey, tx.now)).fetchone() is not None
                tx.stale = not held
                return (size if held else None), False
        self._access[key] = tx.now
        return size, True

    def _count_dedup(self, db: sqlite3.Connection) -> None:
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'dedup_hits'")
        self._note("dedup_hits")

    def _settle(self, tx: _Tx, key: str) -> None:
        """Content left with no lease and no reader is retained or deleted."""
        self._engine.settle(_IndexRoom(self, tx), key)

    def _add_content(self, tx: _Tx, key: str, size: int) -> bool:
        """Add the row of new content ``key`` (making room for it under
        ``max_bytes`` first); False, having changed nothing, if it has a row."""
        db = tx.db
        if self.policies.max_bytes is not None:
            if db.execute(_SQL_CONTENT, (key,)).fetchone() is not None:
                return False
            self._make_room(tx, size)
        if db.execute(_SQL_ADD_CONTENT, {"cid": key, "size": size, "now": tx.now}).rowcount <= 0:
            return False
        if key in tx.doomed:
            # deleted earlier in this transaction: its new file must stay
            tx.doomed = [k for k in tx.doomed if k != key]
        self._cache_size(key, size)
        return True

    def _cache_size(self, key: str, size: int) -> None:
        if len(self._sizes) >= _SIZE_CACHE_ENTRIES:
            self._sizes.clear()
        self._sizes[key] = size

    def _delete(self, tx: _Tx, key: str) -> int:
        """Delete content ``key`` with its leases and holds; its file is
        unlinked after the transaction commits."""
        db = tx.db
        rows = db.execute("DELETE FROM content WHERE cid = ? RETURNING size", (key,)).fetchall()
        db.execute("DELETE FROM leases WHERE cid = ?", (key,))
        db.execute("DELETE FROM holds WHERE cid = ?", (key,))
        tx.doomed.append(key)
        if not rows:
            return 0
        size = int(rows[0][0])
        tx.deleted += 1
        tx.freed += size
        return size

    def _trim_retained(self, tx: _Tx, budget: int) -> None:
        self._engine.trim_retained(_IndexRoom(self, tx), budget)

    def _make_room(self, tx: _Tx, size: int) -> None:
        """Evict per policy so ``size`` more bytes fit under ``max_bytes``
        (which must be set), or raise StoreFull having changed nothing."""
        self._flush_access(tx)  # the LRU order as of now
        self._engine.make_room(_IndexRoom(self, tx), size)

    def _end_leases(self, tx: _Tx, where: str, args: tuple[Any, ...]) -> int:
        """Delete the leases matching ``where`` and settle their content."""
        return self._end_rows(tx, "leases", where, args)

    def _end_holds(self, tx: _Tx, where: str, args: tuple[Any, ...]) -> int:
        """Delete the reader holds matching ``where`` and settle their content."""
        return self._end_rows(tx, "holds", where, args)

    def _end_rows(self, tx: _Tx, table: str, where: str, args: tuple[Any, ...]) -> int:
        """Many rows (a dead process's thousands of leases) are ended
        ``_SLICE_KEYS`` content ids at a time, in slices (see _maybe_slice)."""
        db = tx.db
        count = 0
        select = f"SELECT DISTINCT cid FROM {table} WHERE {where} LIMIT {_SLICE_KEYS + 1}"
        while True:
            keys = [r[0] for r in db.execute(select, args)]
            if not keys:
                return count
            if len(keys) <= _SLICE_KEYS:
                count += db.execute(f"DELETE FROM {table} WHERE {where}", args).rowcount
            else:
                keys = keys[:_SLICE_KEYS]
                marks = ", ".join("?" * len(keys))
                count += db.execute(
                    f"DELETE FROM {table} WHERE ({where}) AND cid IN ({marks})", (*args, *keys)
                ).rowcount
            for key in keys:
                self._settle(tx, key)
            if len(keys) < _SLICE_KEYS:
                return count
            self._maybe_slice(tx)

    def _expire(self, tx: _Tx) -> int:
        return self._end_leases(tx, "expires_at IS NOT NULL AND expires_at <= ?", (tx.now,))

    def _expire_some(self, tx: _Tx, limit: int) -> int:
        """End at most ``limit`` expired leases (and free their content)."""
        return self._end_leases(
            tx,
            "(cid, lid) IN (SELECT cid, lid FROM leases "
            "WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?)",
            (tx.now, limit),
        )

    def _reap(self, tx: _Tx) -> tuple[int, int, int]:
        """End leases and holds of dead owners and expired leases: (leases,
        holds, owners). A lock owner is dead when its lock file is unlocked,
        or missing (for an owner of this pid namespace, only if its pid is
        also dead or started at another time: its file may have been removed
        behind its back); a pid owner of this pid namespace when its pid is
        dead or started at another time; pid owners of other namespaces are
        never judged here. Lock files of dead owners go after ``tx`` commits."""
        db = tx.db
        self._check_owners_dir()
        # every owner of a non-detached lease or a hold has a row (see
        # directory_index): a small table, not a scan of every lease
        rows = db.execute("SELECT owner, pid, start, scope FROM owners").fetchall()
        mine = process_token()  # never probe our own lock (closing the probe would drop it)
        scope = self._scope
        judge_pids = can_judge_pids()
        starts: dict[int, float | None] = {}
        dead_owners = leases = holds = 0
        for owner, pid, start, owner_scope in rows:
            if owner == mine:
                continue
            lock_owner = is_owner_token(owner)
            if lock_owner:
                state = probe_owner(self._owners_fd, owner)
                if state:
                    continue
                if state is None and owner_scope == scope and judge_pids:
                    # its file was removed behind its back (it puts it back at
                    # its next reap): in our own namespace its pid can tell
                    if pid not in starts:
                        starts[pid] = process_start_time(pid)
                    current = starts[pid]
                    if current is not None and same_start(start, current):
                        continue
            else:
                if owner_scope != scope or not judge_pids:
                    continue
                if pid not in starts:
                    starts[pid] = process_start_time(pid)
                current = starts[pid]
                if current is not None and same_start(start, current):
                    continue
            ended_leases = self._end_leases(tx, "owner = ? AND detached = 0", (owner,))
            ended_holds = self._end_holds(tx, "owner = ?", (owner,))
            db.execute("DELETE FROM owners WHERE owner = ?", (owner,))
            if lock_owner:
                tx.dead_owners.append(owner)
            if ended_leases or ended_holds:
                dead_owners += 1
            leases += ended_leases
            holds += ended_holds
        if judge_pids:
            recorded = db.execute(
                "SELECT pid, start FROM processes WHERE scope = ?", (scope,)
            ).fetchall()
            for pid, start in recorded:
                if pid not in starts:
                    starts[pid] = process_start_time(pid)
                current = starts[pid]
                if current is None or not same_start(start, current):
                    db.execute(
                        "DELETE FROM processes WHERE scope = ? AND pid = ? AND start = ?",
                        (scope, pid, start),
                    )
        leases += self._expire(tx)
        db.execute("UPDATE meta SET value = ? WHERE key = 'last_reap'", (tx.now,))
        self._reaps.reaped(tx.now)
        return leases, holds, dead_owners

    @_frees
    def _auto_reap(self) -> None:
        """Reap if no process has in the last ``reap_interval`` seconds."""
        with self._write(maintain=False) as tx:
            last = tx.db.execute("SELECT value FROM meta WHERE key = 'last_reap'").fetchone()
            if self._reaps.due_after(float(last[0]) if last else 0.0, tx.now):
                self._reap(tx)

    def _is_held(self, cid: ContentId, lid: LeaseId) -> bool:
        with self._lock:
            db = self._conn()
            if self._read_only:
                return self._held_read_only(db, str(cid), str(lid), time.time()) is not None
            return db.execute(_SQL_HELD, (str(cid), str(lid), time.time())).fetchone() is not None

    def _held_read_only(
        self, db: sqlite3.Connection, key: str, lkey: str, now: float
    ) -> int | None:
        """A read-only handle's lease check: the size if ``(lkey, key)`` is
        held in this process or in the index, else None (lock held)."""
        local = (key, lkey)
        if local in self._local_leases:
            expires = self._local_leases[local]
            if expires is None or expires > now:
                row = db.execute(_SQL_CONTENT, (key,)).fetchone()
                return None if row is None else int(row[0])
            del self._local_leases[local]
        row = db.execute(_SQL_HELD, (key, lkey, now)).fetchone()
        return None if row is None else int(row[0])

    @_frees
    def _read_op(self, *, flush: bool = False) -> sqlite3.Connection:
        """Start a read-only operation (lock held): reap if due, end expired
        leases if any, and (if ``flush``) write recorded accesses."""
        db = self._op()
        if self._read_only:
            return db
        if (flush and self._access) or db.execute(
            _SQL_EXPIRED, (time.time(),)
        ).fetchone() is not None:
            with self._write(maintain=False, flush=flush):
                pass
        return db

    # -- the backend methods -------------------------------------------------------------

    @_index_errors
    def _store(
        self,
        cid: ContentId,
        data: memoryview,
        lid: LeaseId,
        ttl: float | None,
        detached: bool,
        hashed: bool,
    ) -> None:
        key = str(cid)
        if self._read_only:
            self._refuse_read_only("store")
        if data.nbytes <= _SMALL_STORE:
            self._place(cid, key, None, data.nbytes, lid, ttl, detached, data=data, hashed=hashed)
            return
        with self._lock:
            db = self._op()
            held, present = db.execute(
                _SQL_HELD_PRESENT, {"cid": key, "lid": str(lid), "now": time.time()}
            ).fetchone()
        if held:
            return
        if present:
            # _op() above maintained; an expired row is settled by _place
            with self._write(maintain=False, expire=False) as tx:
                size, new = self._hold(tx, key, lid, ttl, detached)
                if new:
                    self._count_dedup(tx.db)
            if size is not None:
                return
        if not hashed and not cid.matches(data):
            raise IntegrityError(f"data does not hash to {cid}")
        name = self._write_temp(data)
        self._place(cid, key, name, data.nbytes, lid, ttl, detached)

    @_index_errors
    def _store_unhashed(
        self, data: memoryview, lid: LeaseId, algorithm: str, ttl: float | None, detached: bool
    ) -> ContentId:
        """A big blob is hashed in this handle's worker thread while this
        thread writes the temporary file (both release the GIL); the file is
        placed under its id once the hash is known (content already present
        or held: the file is discarded, a dedup hit counted as by _store).
        Small blobs, and stores while the worker is busy with another
        thread's blob, hash first as the base class does."""
        if data.nbytes < _OVERLAP_MIN or not self._hasher_busy.acquire(blocking=False):
            return super()._store_unhashed(data, lid, algorithm, ttl, detached)
        try:
            hasher = new_hasher(algorithm)
            with self._lock:
                self._op()  # closed: StorageError before any work
                pool = self._hasher()
            try:
                future: Future[None] = pool.submit(hasher.update, data)
            except RuntimeError:  # shut down by a concurrent close()
                return super()._store_unhashed(data, lid, algorithm, ttl, detached)
            try:
                name = self._write_temp(data)  # removes its file if it fails
            except BaseException:
                _wait_futures([future])  # the worker must be done with data
                raise
            try:
                future.result()
            except BaseException:
                _wait_futures([future])
                self._discard_temp(name)
                raise
        finally:
            self._hasher_busy.release()
        cid = ContentId(algorithm, hasher.digest())
        self._place(cid, str(cid), name, data.nbytes, lid, ttl, detached)
        return cid

    def _hasher(self) -> ThreadPoolExecutor:
        """This handle's hashing thread in this process (lock held), created
        on first use: one inherited through fork has no thread behind it."""
        pid = os.getpid()
        pool = self._hasher_pool
        if pool is None or self._hasher_pid != pid:
            pool = ThreadPoolExecutor(1, thread_name_prefix="blobleases-hash")
            self._hasher_pool, self._hasher_pid = pool, pid
        return pool

    def _place(
        self,
        cid: ContentId,
        key: str,
        name: str | None,
        size: int,
        lid: LeaseId,
        ttl: float | None,
        detached: bool,
        *,
        data: memoryview | None = None,
        hashed: bool = True,
    ) -> None:
        """Hold ``(lid, cid)`` in one transaction: on present content (a
        dedup hit; a no-op if the lease is held) or, if it is absent, by
        moving its complete, verified temporary file into place with its row
        and lease. The file is ``name``, written beforehand, or (``name``
        None) ``data``, written here inside the transaction after checking
        its hash (unless ``hashed``). Removes the temporary file unless it
        was placed."""
        placed = False
        try:
            with self._lock:
                tx = self._begin(expire=False)
                try:
                    absent = self._add_content(tx, key, size)
                    if not absent:
                        have, new = self._hold(tx, key, lid, ttl, detached)
                        if have is None and tx.stale:
                            # a row whose only leases expired: settle it, then retry
                            self._settle(tx, key)
                            have, new = self._hold(tx, key, lid, ttl, detached)
                        if have is not None:
                            if new:
                                self._count_dedup(tx.db)
                        elif self._add_content(tx, key, size):
                            absent = True
                        else:
                            raise StorageError(f"cannot add {cid} to the index of {self._root!r}")
                    if absent:
                        if name is None:
                            assert data is not None
                            if not hashed and not cid.matches(data):
                                raise IntegrityError(f"data does not hash to {cid}")
                            name = self._write_temp(data)
                        self._in_shard(
                            cid,
                            functools.partial(self._rename_in, name, cid.hex),
                            create=True,
                            check=True,
                        )
                        placed = True
                        self._hold(tx, key, lid, ttl, detached, first=True)
                except BaseException as exc:
                    self._abort(tx, exc)
                self._commit(tx)
        except BaseException:
            if placed:
                self._discard_placed(cid, key)
            raise
        finally:
            if name is not None and not placed:
                self._discard_temp(name)

    def _rename_in(self, name: str, target: str, shard: int) -> None:
        """Move temporary file ``name`` to ``target`` in directory ``shard``."""
        os.replace(name, target, src_dir_fd=self._tmp_fd, dst_dir_fd=shard)
        if self._safe:
            os.fsync(shard)

    def _discard_placed(self, cid: ContentId, key: str) -> None:
        """Undo a rename whose transaction failed: unlink the file unless a
        row (of another store) names it."""
        with self._lock:
            if self._db is not None and self._db_pid == os.getpid():
                self._unlink_unreferenced(self._db, [key])

    @_index_errors
    def _store_file(
        self, source: FileSource, lid: LeaseId, algorithm: str, ttl: float | None, detached: bool
    ) -> tuple[ContentId, int]:
        hasher = new_hasher(algorithm)
        with self._lock:
            self._op()
        name, fd = self._open_temp()
        try:
            with ingest.open_source(
                source, lambda path, exc: _error(f"cannot read {path!r}", exc)
            ) as f:
                size = ingest.copy(
                    f,
                    hasher,
                    lambda chunk: _write_all(fd, chunk),
                    lambda exc: _error("cannot read the source file", exc),
                )
            if self._safe:
                os.fsync(fd)
        except BaseException as exc:
            os.close(fd)
            self._discard_temp(name)
            if isinstance(exc, OSError) and not isinstance(exc, StorageError):
                raise _error(f"cannot write a blob in {self._root!r}", exc) from exc
            raise
        os.close(fd)
        cid = ContentId(algorithm, hasher.digest())
        self._place(cid, str(cid), name, size, lid, ttl, detached)
        return cid, size

    @_index_errors
    def _lease_by_content(
        self, cid: ContentId, lid: LeaseId, ttl: float | None, detached: bool
    ) -> int:
        key = str(cid)
        if self._read_only:
            return self._lease_read_only(cid, lid, ttl)
        with self._lock:
            # Expired leases need not be ended first: the insert ignores them.
            tx = self._begin(expire=False)
            try:
                size, _new = self._hold(tx, key, lid, ttl, detached)
            except BaseException as exc:
                self._abort(tx, exc)
            self._commit(tx)
        if size is None:
            raise ContentNotFound(cid)
        return size

    @_index_errors
    def _take_over_lease(self, cid: ContentId, old: LeaseId, new: LeaseId) -> int | None:
        key = str(cid)
        if self._read_only:
            try:
                return self._lease_read_only(cid, new, None)
            except ContentNotFound:
                return None
        with self._lock:
            # One transaction: ``new`` is inserted as _lease_by_content does
            # (the unexpired ``old`` counts as a holder), then ``old`` goes.
            tx = self._begin(expire=False)
            tx.known = cid
            try:
                size, _new = self._hold(tx, key, new, None, False)
                ended = tx.db.execute(
                    "DELETE FROM leases WHERE cid = ? AND lid = ?", (key, str(old))
                ).rowcount
                if size is None and ended:
                    self._settle(tx, key)  # ``old`` had expired: free its content now
            except BaseException as exc:
                self._abort(tx, exc)
            self._commit(tx)
        return size

    def _lease_read_only(self, cid: ContentId, lid: LeaseId, ttl: float | None) -> int:
        """A lease of a read-only handle: held in this process only (the
        store cannot record it), on content that is present."""
        key, lkey = str(cid), str(lid)
        with self._lock:
            db = self._op()
            now = time.time()
            size = self._held_read_only(db, key, lkey, now)
            if size is None:
                row = db.execute(_SQL_PRESENT_SIZE, {"cid": key, "now": now}).fetchone()
                if row is None:
                    raise ContentNotFound(cid)
                size = int(row[0])
            self._local_leases[(key, lkey)] = policy_rules.expires_at(ttl, now)
        return size

    @_index_errors
    def _get_data(self, cid: ContentId, lid: LeaseId) -> bytes:
        key = str(cid)
        with self._lock:
            db = self._op()
            now = time.time()
            size = self._sizes.get(key)
            if self._read_only:
                size = self._held_read_only(db, key, str(lid), now)
                if size is None:
                    raise self._lease_expired(cid, lid)
            elif size is None:
                row = db.execute(_SQL_HELD, (key, str(lid), now)).fetchone()
                if row is None:
                    raise self._lease_expired(cid, lid)
                size = int(row[0])
                self._cache_size(key, size)
            elif db.execute(_SQL_HELD_ONLY, (key, str(lid), now)).fetchone() is None:
                raise self._lease_expired(cid, lid)
            self._touch(key, now)
        fd = self._open_blob(cid, lid, size)
        try:
            data = _read_exact(fd, size) if size else b""
        except OSError as exc:
            raise _error(f"cannot read the file of blob {cid}", exc) from exc
        finally:
            os.close(fd)
        self._engine.check_read(cid, data, size, len(data))
        return data

    @_index_errors
    def _get_reader(self, cid: ContentId, lid: LeaseId) -> BlobReader:
        key = str(cid)
        if self._read_only:
            # nothing can free the content through this handle: a hold in
            # this process only (nothing to release)
            with self._lock:
                size = self._held_read_only(self._op(), key, str(lid), time.time())
            if size is None:
                raise self._lease_expired(cid, lid)
            return BlobReader(self._map(cid, lid, size), size, lambda: None)
        with self._write() as tx:
            row = tx.db.execute(_SQL_HELD, (key, str(lid), tx.now)).fetchone()
            if row is None:
                raise self._lease_expired(cid, lid)
            owner = self._owner if self._owner_recorded else self._own_owner(tx.db)
            hold = tx.db.execute(
                "INSERT INTO holds(cid, pid, start, owner) VALUES (?, ?, ?, ?)",
                (key, self._mypid, self._mystart, owner),
            ).lastrowid
            self._access[key] = tx.now
        size = int(row[0])
        assert hold is not None
        try:
            source = self._map(cid, lid, size)
        except BaseException:
            self._release_hold(hold, key)
            raise

        def release() -> None:
            self._release_hold(hold, key)

        return BlobReader(source, size, release)

    def _map(self, cid: ContentId, lid: LeaseId, size: int) -> BufferSource:
        fd = self._open_blob(cid, lid, size)
        try:
            mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None
        except OSError as exc:
            raise _error(f"cannot map the file of blob {cid}", exc) from exc
        finally:
            os.close(fd)
        source = _mmap_source(mapped)
        try:
            self._engine.check_read(cid, source.buffer(), size, size)  # (fstat checked the size)
        except BaseException:
            source.close()
            raise
        return source

    def _deferred(self, work: Callable[..., None], *args: Any) -> bool:
        """True if this thread holds this store's writer lock (a finalizer
        run by the garbage collector inside a transaction): then
        ``work(*args)`` runs right after the lock is let go, where starting
        a transaction of its own would fail (or wait for itself)."""
        writer = self._writer_lock
        # None: this handle never wrote, so it holds no lease or reader
        if writer is None or writer.owner != threading.get_ident() or writer.pid != os.getpid():
            return False
        writer.deferred.append(functools.partial(work, *args))
        return True

    @_frees
    @_index_errors
    def _release_hold(self, hold: int, key: str) -> None:
        if self._deferred(self._release_hold, hold, key):
            return
        with self._lock:
            if self._closed or self._db_pid != os.getpid():
                return  # a closed store's holds end when the process is reaped
            with self._write() as tx:
                if tx.db.execute("DELETE FROM holds WHERE id = ?", (hold,)).rowcount:
                    self._settle(tx, key)

    @_index_errors
    def _take_over_reader(self, cid: ContentId, old: LeaseId, new: LeaseId) -> BlobReader | None:
        """``take_over_lease(cid, old, new)`` and ``get_reader(cid, new)`` in
        one transaction, for :func:`~blobleases.loads`: a reader whose hold
        ends together with the lease ``new`` (one transaction again) when it
        is closed and its views are gone. None if the content is absent
        (``old`` is ended all the same). Not for read-only handles."""
        key = str(cid)
        if self._read_only:
            self._refuse_read_only("take over a lease")
        with self._lock:
            tx = self._begin(expire=False)
            tx.known = cid
            try:
                size, _new = self._hold(tx, key, new, None, False)
                ended = tx.db.execute(
                    "DELETE FROM leases WHERE cid = ? AND lid = ?", (key, str(old))
                ).rowcount
                hold = None
                if size is None:
                    if ended:
                        self._settle(tx, key)  # ``old`` had expired: free its content now
                else:
                    owner = self._owner if self._owner_recorded else self._own_owner(tx.db)
                    hold = tx.db.execute(
                        "INSERT INTO holds(cid, pid, start, owner) VALUES (?, ?, ?, ?)",
                        (key, self._mypid, self._mystart, owner),
                    ).lastrowid
                    self._access[key] = tx.now
            except BaseException as exc:
                self._abort(tx, exc)
            self._commit(tx)
        if size is None:
            return None
        assert hold is not None
        try:
            source = self._map(cid, new, size)
        except BaseException:
            self._release_hold_and_lease(hold, key, str(new))
            raise

        def release() -> None:
            self._release_hold_and_lease(hold, key, str(new))

        return BlobReader(source, size, release)

    @_frees
    @_index_errors
    def _release_hold_and_lease(self, hold: int, key: str, lid: str) -> None:
        if self._deferred(self._release_hold_and_lease, hold, key, lid):
            return
        with self._lock:
            if self._closed or self._db_pid != os.getpid():
                return  # a closed store's holds and leases end when the process is reaped
            with self._write(expire=False) as tx:
                ended = tx.db.execute("DELETE FROM holds WHERE id = ?", (hold,)).rowcount
                ended += tx.db.execute(
                    "DELETE FROM leases WHERE cid = ? AND lid = ?", (key, lid)
                ).rowcount
                if ended:
                    self._settle(tx, key)

    @_frees
    @_index_errors
    def _advise_lease_dropped(self, lid: LeaseId, cid: ContentId) -> None:
        if self._deferred(self._advise_lease_dropped, lid, cid):
            return
        key = str(cid)
        if self._read_only:
            with self._lock:
                if self._local_leases.pop((key, str(lid)), 0) != 0:
                    return
                if not self._is_held(cid, lid):
                    return  # not held: a no-op
        with self._lock:
            # No need to end expired leases first: settling ignores them.
            tx = self._begin(expire=False)
            tx.known = cid
            try:
                if tx.db.execute(
                    "DELETE FROM leases WHERE cid = ? AND lid = ?", (key, str(lid))
                ).rowcount:
                    self._settle(tx, key)
            except BaseException as exc:
                self._abort(tx, exc)
            self._commit(tx)

    # Owners of leases and holds of ``pid`` recorded in this pid namespace.
    _OWNERS_OF_PID = "owner IN (SELECT owner FROM owners WHERE pid = ? AND scope = ?)"

    @_frees
    @_index_errors
    def _advise_of_pid(self, pid: int) -> None:
        with self._lock:
            self._op()
        if not can_judge_pids():
            return  # /proc shows another pid namespace: its start time is unknowable
        start = process_start_time(pid)
        if start is None:
            return
        with self._write() as tx:
            if start:
                stale = self._OWNERS_OF_PID + " AND start != 0 AND abs(start - ?) > ?"
                args = (pid, self._scope, start, START_TIME_TOLERANCE)
                self._end_leases(tx, stale + " AND detached = 0", args)
                self._end_holds(tx, stale, args)
            tx.db.execute(
                "INSERT OR REPLACE INTO processes(scope, pid, start, seen) VALUES (?, ?, ?, ?)",
                (self._scope, pid, start, tx.now),
            )

    @_frees
    @_index_errors
    def _advise_pid_terminated(self, pid: int) -> None:
        with self._write() as tx:
            args = (pid, self._scope)
            self._end_leases(tx, self._OWNERS_OF_PID + " AND detached = 0", args)
            self._end_holds(tx, self._OWNERS_OF_PID, args)
            # pid owners go; a lock owner's row stays until a reap finds it dead
            tx.db.execute(
                "DELETE FROM owners WHERE pid = ? AND scope = ? AND owner LIKE 'pid:%'", args
            )
            tx.db.execute("DELETE FROM processes WHERE scope = ? AND pid = ?", (self._scope, pid))

    @_index_errors
    def _contains(self, cid: ContentId) -> bool:
        with self._lock:
            db = self._read_op()
            return db.execute(_SQL_CONTENT, (str(cid),)).fetchone() is not None

    @_index_errors
    def _stat(self, cid: ContentId) -> BlobInfo:
        key = str(cid)
        with self._lock:
            db = self._read_op(flush=True)
            now = time.time()
            row = db.execute(
                "SELECT size, created, last_access, "
                "(SELECT count(*) FROM leases WHERE cid = :cid "
                "AND (expires_at IS NULL OR expires_at > :now)), "
                "(SELECT count(*) FROM holds WHERE cid = :cid) "
                "FROM content WHERE cid = :cid",
                {"cid": key, "now": now},
            ).fetchone()
        if row is None:
            raise ContentNotFound(cid)
        size, created, last_access, leases, holds = row
        return BlobInfo(cid, int(size), int(leases), int(holds), created, last_access)

    @_index_errors
    def _iter_content(self) -> list[ContentId]:
        with self._lock:
            db = self._read_op()
            keys = [r[0] for r in db.execute("SELECT cid FROM content")]
        return [ContentId.parse(k) for k in keys]

    @_index_errors
    def _iter_leases(self) -> list[LeaseInfo]:
        with self._lock:
            db = self._read_op()
            rows = db.execute(
                "SELECT lid, cid, expires_at, detached FROM leases "
                "WHERE expires_at IS NULL OR expires_at > ?",
                (time.time(),),
            ).fetchall()
        out = []
        for lkey, key, expires_at, detached in rows:
            lid = LeaseId.parse(lkey)
            out.append(LeaseInfo(lid, ContentId.parse(key), lid.pid, expires_at, bool(detached)))
        return out

    @_index_errors
    def _why(self, cid: ContentId) -> WhyReport:
        """One read transaction: the content row, its unexpired leases (with
        ``created`` where the row has it) and its holds grouped by process;
        host and locality from the scope of each owner."""
        key = str(cid)
        with self._lock:
            db = self._read_op(flush=True)
            now = time.time()
            created = "l.created" if has_lease_created(db) else "NULL"
            began = not db.in_transaction
            if began:
                db.execute("BEGIN")
            try:
                content = db.execute(
                    "SELECT size, created, last_access, retained FROM content WHERE cid = ?",
                    (key,),
                ).fetchone()
                leases = db.execute(
                    f"SELECT l.lid, l.expires_at, l.detached, l.owner, {created}, o.scope "
                    "FROM leases l LEFT JOIN owners o ON o.owner = l.owner WHERE l.cid = ? "
                    "AND (l.expires_at IS NULL OR l.expires_at > ?)",
                    (key, now),
                ).fetchall()
                holds = db.execute(
                    "SELECT h.pid, h.owner, o.scope, count(*) FROM holds h "
                    "LEFT JOIN owners o ON o.owner = h.owner WHERE h.cid = ? "
                    "GROUP BY h.pid, h.owner ORDER BY h.pid",
                    (key,),
                ).fetchall()
            finally:
                if began:
                    db.execute("COMMIT")
        if content is None:
            raise ContentNotFound(cid)
        size, blob_created, last_access, retained = content

        def where(owner: str, scope: str | None) -> tuple[str | None, bool]:
            if scope is None and owner.startswith("pid:"):
                scope = owner.split(":", 3)[3]
            return scope_host(scope, self._scope)

        infos = []
        for lkey, expires_at, detached, owner, lease_created, scope in leases:
            lid = LeaseId.parse(lkey)
            host, local = where(owner, scope)
            infos.append(
                LeaseInfo(lid, cid, lid.pid, expires_at, bool(detached), lease_created, host, local)
            )
        infos.sort(key=lambda i: (i.created_at or math.inf, str(i.lease_id)))
        readers = []
        for pid, owner, scope, count in holds:
            host, local = where(owner, scope)
            readers.append(ReaderInfo(int(pid), int(count), host, local))
        info = BlobInfo(
            cid, int(size), len(infos), sum(r.count for r in readers), blob_created, last_access
        )
        return WhyReport(info, tuple(infos), tuple(readers), retained=retained is not None)

    @_index_errors
    def _stats(self) -> StorageStats:
        with self._lock:
            db = self._read_op()
            now = time.time()
            blobs, total, retained_blobs, retained_bytes = db.execute(
                "SELECT count(*), coalesce(sum(size), 0), count(retained), "
                "coalesce(sum(CASE WHEN retained IS NOT NULL THEN size END), 0) FROM content"
            ).fetchone()
            leases = db.execute(
                "SELECT count(*) FROM leases WHERE expires_at IS NULL OR expires_at > ?", (now,)
            ).fetchone()[0]
            readers = db.execute("SELECT count(*) FROM holds").fetchone()[0]
            owners = db.execute(
                "SELECT owner FROM leases WHERE expires_at IS NULL "
                "OR expires_at > ? UNION SELECT owner FROM holds",
                (now,),
            ).fetchall()
            hits = db.execute("SELECT value FROM meta WHERE key = 'dedup_hits'").fetchone()
            evicted = dict(
                db.execute(
                    "SELECT key, value FROM meta WHERE key IN ('evictions', 'evicted_bytes')"
                ).fetchall()
            )
        # Detached leases of exited processes still count as leases, but only
        # live processes count as processes.
        live = sum(1 for (owner,) in owners if self._owner_seems_alive(owner))
        return StorageStats(
            blobs=int(blobs),
            bytes=int(total),
            leases=int(leases),
            processes=live,
            dedup_hits=int(hits[0]) if hits else 0,
            readers=int(readers),
            retained_blobs=int(retained_blobs),
            retained_bytes=int(retained_bytes),
            evictions=int(evicted.get("evictions", 0)),
            evicted_bytes=int(evicted.get("evicted_bytes", 0)),
        )

    def _owner_seems_alive(self, owner: str) -> bool:
        """Whether ``owner`` is alive, as far as this process can tell (a pid
        owner of another pid namespace counts as alive)."""
        if is_owner_token(owner):
            return owner == process_token() or owner_alive(self._owners_fd, owner)
        try:
            _, pid, start, scope = owner.split(":", 3)
            if scope != self._scope or not can_judge_pids():
                return True
            return is_alive(int(pid), int(start) / 1_000_000 or None)
        except ValueError:
            return False

    def _remove_dead_owner_files(self) -> int:
        """Remove the lock files of dead owners that no owners row names
        (a row's file goes when a reap ends its rows); returns how many."""
        mine = process_token()
        names = [n for n in os.listdir(self._owners_fd) if is_owner_token(n) and n != mine]
        if not names:
            return 0
        with self._lock:
            db = self._conn()
            listed = {r[0] for r in db.execute("SELECT owner FROM owners")}
        removed = 0
        for name in names:
            if name not in listed and not owner_alive(self._owners_fd, name):
                removed += remove_dead_owner(self._owners_fd, name)
        return removed

    @_frees
    @_index_errors
    def _collect(self) -> CollectReport:
        """In slices (see _maybe_slice); the files of every row are checked
        outside the writer lock and only rows found without their file are
        checked again, and removed, under it."""
        report = CollectReport()
        self._reserve_missing = True  # checked after: another process may have used it
        with self._write(maintain=False, expire=False) as tx:  # _reap expires, counted
            leases, holds, procs = self._reap(tx)
            self._trim_retained(tx, self.policies.retain_bytes)
            report.leases_reaped = leases
            report.readers_reaped = holds
            report.processes_reaped = procs
            report.blobs_deleted = tx.deleted
            report.bytes_freed = tx.freed
        with self._lock:
            keys = [r[0] for r in self._conn().execute("SELECT cid FROM content")]
        missing = [key for key in keys if not self._file_exists(ContentId.parse(key))]
        if missing:
            with self._write(maintain=False, expire=False) as tx:
                for key in missing:
                    cid = ContentId.parse(key)
                    if tx.db.execute(
                        _SQL_CONTENT, (key,)
                    ).fetchone() is not None and not self._file_exists(cid):
                        self._delete(tx, key)
                        tx.deleted -= 1
                        report.rows_removed += 1
                    self._maybe_slice(tx)
                report.blobs_deleted += tx.deleted
                report.bytes_freed += tx.freed
        report.files_removed = len(self._remove_orphans(repair=True))
        try:
            self._remove_dead_owner_files()
        except OSError as exc:
            raise _error(f"cannot list {self._root!r}/owners", exc) from exc
        return report

    def _file_exists(self, cid: ContentId) -> bool:
        """Whether ``cid``'s file exists, a miss confirmed by a fresh path
        look-up (never a stale directory's say-so)."""
        name = cid.hex

        def look(shard: int) -> None:
            os.stat(name, dir_fd=shard, follow_symlinks=False)

        try:
            self._in_shard(cid, look)
        except FileNotFoundError:
            return False
        return True

    def _scan_blob_files(self) -> list[tuple[str, str, str]]:
        """Every (algorithm, shard, name) non-directory entry under blobs/."""
        found: list[tuple[str, str, str]] = []
        for alg in ALGORITHMS:
            with self._lock:
                held = self._dir_fd("blobs/" + alg, create=False, check=True)
                if held is None:
                    continue
                alg_fd = os.dup(held)
            try:
                for shard in os.listdir(alg_fd):
                    if not _HEX2.fullmatch(shard):
                        continue
                    try:
                        shard_fd = os.open(shard, _O_DIR, dir_fd=alg_fd)
                    except OSError:
                        continue
                    try:
                        with os.scandir(shard_fd) as entries:
                            for entry in entries:
                                if not entry.is_dir(follow_symlinks=False):
                                    found.append((alg, shard, entry.name))
                    finally:
                        os.close(shard_fd)
            finally:
                os.close(alg_fd)
        return found

    def _dead_temp_files(self) -> list[str]:
        """Names in tmp/ whose writer is dead (or that no writer of ours made).
        A writer is its owner token (alive while its lock is held); files of
        writers of schema version 1 are judged by pid and start time, and
        only where this process can judge pids."""
        dead: list[str] = []
        mine = process_token()
        owners: dict[str, bool] = {}
        alive: dict[int, float | None] = {}
        with self._lock:
            tmp = self._dir_fd("tmp", create=False, check=True)
            names = [] if tmp is None else os.listdir(tmp)
        for name in names:
            match = _TMP_NAME.fullmatch(name)
            if match is not None:
                token = match.group(1)
                if token == mine:
                    continue
                if token not in owners:
                    owners[token] = owner_alive(self._owners_fd, token)
                if owners[token]:
                    continue
                dead.append(name)
                continue
            match = _TMP_NAME_V1.fullmatch(name)
            if match is not None:
                if not can_judge_pids():
                    continue
                pid, start = int(match.group(1)), int(match.group(2)) / 1_000_000
                if pid not in alive:
                    alive[pid] = process_start_time(pid)
                current = alive[pid]
                if current is not None and same_start(start, current):
                    continue
            dead.append(name)
        return dead

    def _remove_orphans(self, *, repair: bool) -> list[str]:
        """Blob files that no row names and temporary files of dead writers,
        as paths; removed when ``repair``. Checked under the write lock, so a
        concurrent store's new file is never taken for an orphan."""
        try:
            candidates = self._scan_blob_files()
            temps = self._dead_temp_files()
        except OSError as exc:
            raise _error(f"cannot list the files of {self._root!r}", exc) from exc
        orphans: list[str] = []
        # Files with a row now are not orphans: only the others are checked
        # again, under the write lock (in slices).
        with self._lock:
            known = {r[0] for r in self._conn().execute("SELECT cid FROM content")}
        candidates = [
            (alg, shard, name)
            for alg, shard, name in candidates
            if f"{alg}-{name}" not in known or not _HEX64.fullmatch(name) or name[:2] != shard
        ]
        with self._checking() as (db, tx):
            for alg, shard, name in candidates:
                if tx is not None:
                    self._maybe_slice(tx)
                if _HEX64.fullmatch(name) and name[:2] == shard:
                    key = f"{alg}-{name}"
                    if db.execute("SELECT 1 FROM content WHERE cid = ?", (key,)).fetchone():
                        continue
                path = os.path.join(self._root, "blobs", alg, shard, name)
                orphans.append(path)
                if repair:
                    with self._lock:
                        alg_fd = self._dir_fd("blobs/" + alg, create=False)
                        shard_fd = None if alg_fd is None else self._open_dir_at(alg_fd, shard)
                    if shard_fd is None:
                        continue
                    try:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(name, dir_fd=shard_fd)
                    finally:
                        os.close(shard_fd)
        for name in temps:
            orphans.append(os.path.join(self._root, "tmp", name))
            if repair:
                with contextlib.suppress(FileNotFoundError), self._lock:
                    os.unlink(name, dir_fd=self._tmp_fd)
        return orphans

    @contextlib.contextmanager
    def _checking(self) -> Iterator[tuple[sqlite3.Connection, _Tx | None]]:
        """The index under the write lock, with its transaction (for a
        read-only handle, which cannot take it, the index as it is and
        None)."""
        if self._read_only:
            with self._lock:
                yield self._conn(), None
        else:
            with self._write(maintain=False) as tx:
                yield tx.db, tx

    @_frees
    @_index_errors
    def _verify(self, repair: bool) -> VerifyReport:
        if repair and self._read_only:
            self._refuse_read_only("repair it (verify without repair)")
        problems = self._index_problems()
        if problems:
            # nothing is repaired through a broken index: every row and file
            # would be judged by what it says
            return VerifyReport(index_errors=problems)
        with self._lock:
            db = self._read_op()
            rows = db.execute("SELECT cid, size FROM content").fetchall()
        report = VerifyReport(checked=len(rows))
        for key, size in rows:
            cid = ContentId.parse(key)
            try:
                intact = self._check_file(cid, int(size)) is not None
            except FileNotFoundError:
                with self._lock:
                    still = self._conn().execute(_SQL_CONTENT, (key,)).fetchone()
                if still is not None:
                    report.missing.append(cid)
                continue
            except OSError as exc:
                raise _error(f"cannot read the file of blob {cid}", exc) from exc
            if not intact:
                report.corrupted.append(cid)
        report.orphaned = self._remove_orphans(repair=repair)
        if repair and report:
            with self._write(maintain=False) as tx:
                for cid in report.corrupted + report.missing:
                    self._delete(tx, str(cid))
                    self._maybe_slice(tx)
            report.repaired = True
        return report

    def _index_problems(self) -> list[str]:
        """What is wrong with the index itself: SQLite's ``quick_check`` of
        its pages, then a decode of every row (which ``quick_check`` does not
        do: text that is not UTF-8, ids that do not parse)."""
        path = self._index_path
        problems: list[str] = []
        with self._lock:
            db = self._conn()
            try:
                for (line,) in db.execute("PRAGMA quick_check(20)"):
                    if line != "ok":
                        problems.append(f"{path}: {line}")
            except sqlite3.Error as exc:
                problems.append(f"{path}: {exc}")
            if problems:
                return problems
            checks: list[tuple[str, str, Callable[[Any], object]]] = [
                (
                    "content",
                    "SELECT cid, size FROM content",
                    lambda r: (ContentId.parse(r[0]), int(r[1])),
                ),
                (
                    "leases",
                    "SELECT cid, lid FROM leases",
                    lambda r: (ContentId.parse(r[0]), LeaseId.parse(r[1])),
                ),
                ("holds", "SELECT cid FROM holds", lambda r: ContentId.parse(r[0])),
            ]
            for table, sql, decode in checks:
                try:
                    for row in db.execute(sql):
                        try:
                            decode(row)
                        except (ValueError, TypeError) as exc:
                            problems.append(f"{path}: a row of {table} does not decode: {exc}")
                            if len(problems) >= 20:
                                return problems
                except sqlite3.Error as exc:
                    problems.append(f"{path}: reading {table}: {exc}")
        return problems

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            db = self._db
            if db is not None and self._db_pid == os.getpid():
                self._finish()
                with contextlib.suppress(StorageError, OSError):
                    self._release_owner()
                with contextlib.suppress(sqlite3.Error):
                    db.close()
            elif db is not None:
                _INHERITED.append(db)
            self._db = None
            self._closed = True
            pool, self._hasher_pool = self._hasher_pool, None
            if pool is not None and self._hasher_pid == os.getpid():
                pool.shutdown(wait=False)
            self._close_fds()
            if self._finalizer is not None:
                self._finalizer()

    def _finish(self) -> None:
        """What closing this handle writes, also done at interpreter exit
        for a handle left open (call with the lock held): the recorded
        accesses, and the end of expired leases, so content whose leases
        expired is freed now rather than when some process next opens the
        store. Bounded work: at most ``_CLOSE_EXPIRE_LIMIT`` leases (the
        rest go at the next operation of any process). A temporary store
        is about to be removed: nothing to expire."""
        db = self._db
        if self._closed or db is None or self._db_pid != os.getpid():
            return
        expired = False
        if not self._temporary:
            with contextlib.suppress(sqlite3.Error):
                expired = db.execute(_SQL_EXPIRED, (time.time(),)).fetchone() is not None
        if self._access or expired:
            with (
                contextlib.suppress(StorageError),
                self._write(maintain=False, expire=False, flush=True) as tx,
            ):
                self._expire_some(tx, _CLOSE_EXPIRE_LIMIT)

    def _close_fds(self) -> None:
        fds = [*self._shards.values(), *self._dirs.values()]
        self._shards = OrderedDict()
        fds += [fd for fd in (self._owners_fd, self._root_fd) if fd >= 0]
        self._dirs = {}
        self._blobs_fd = self._tmp_fd = self._owners_fd = self._root_fd = -1
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
