"""The locks of a :class:`~blobleases.directory.DirectoryStorage`: the writer
lock every writer of a store queues on, who holds a lock (from /proc/locks),
this process's owner lock and the owners it judges by theirs, and what a
forked child and the interpreter's exit do with a handle."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sqlite3
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from .. import forksafe
from ..errors import BlobLeaseError, StorageError
from ..liveness import (
    OwnerLock,
    can_judge_pids,
    is_alive,
    is_owner_token,
    owner_alive,
    pid_scope,
    process_token,
    remove_dead_owner,
)
from .layout import _O_CLOEXEC, _error, _Layout

if TYPE_CHECKING:
    from .index import _Tx
    from .storage import DirectoryStorage


_SQL_ADD_OWNER = "INSERT OR IGNORE INTO owners(owner, pid, start, scope) VALUES (?, ?, ?, ?)"

_MAX_WAIT = min(threading.TIMEOUT_MAX, 1e9)  # lock_timeout beyond it: as good as forever
_EXIT_WAIT = 5.0  # seconds the exit pass waits for a thread still using a handle

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


class _Locks(_Layout):
    """The writer lock, this process's owner lock and the owners of a
    store's leases and holds; a handle after fork."""

    if TYPE_CHECKING:  # defined by the layers above

        def _conn(self) -> sqlite3.Connection: ...

        def _write(
            self, *, maintain: bool = True, expire: bool = True, flush: bool = False
        ) -> contextlib.AbstractContextManager[_Tx]: ...

    def _writer(self) -> _WriterLock:
        """This process's writer lock of this store (shared by its handles)."""
        writer = self._writer_lock
        if writer is None or writer.pid != os.getpid():
            writer = _WriterLock.of(self._root, self._root_fd)
            self._writer_lock = writer
        return writer

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
