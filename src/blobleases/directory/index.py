"""The SQLite index of a :class:`~blobleases.directory.DirectoryStorage` as a
handle uses it: its connection, the statements of the hot paths, write
transactions (:class:`_Tx`: begin, commit, abort, slices of long work, the
unlinking of deleted content's files after commit), the batched access
writes, and :class:`_IndexRoom`, the engine's room verbs over the index. The
schema itself is :mod:`.schema`."""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

from .. import index_sql
from ..content_id import ContentId
from ..errors import InvalidContentId, InvalidLeaseId, StorageError
from ..lease_id import LeaseId
from ..liveness import own_start_time, pid_scope, remove_dead_owner
from .layout import _INDEX, _MARKER, _MARKER_TEXT, _O_READ, _O_TMP, _error
from .locks import _INHERITED, _holders_text, _Locks, _WriterLock
from .schema import check_schema, connect, create_schema

_SQL_CONTENT = index_sql.CONTENT
_SQL_REFERENCED = index_sql.REFERENCED
_SQL_RETAINED_IN_ORDER = index_sql.RETAINED_IN_ORDER
_SQL_DELETE_UNREFERENCED = index_sql.DELETE_UNREFERENCED

if TYPE_CHECKING:
    from .leases import _Leases
    from .storage import DirectoryStorage


_F = TypeVar("_F", bound=Callable[..., Any])


_ACCESS_FLUSH_SECONDS = 1.0
_ACCESS_FLUSH_ENTRIES = 512

# Long work (collect, repair, reaping many leases) commits and lets the
# writer lock go after this long, pausing a moment for waiting processes.
_SLICE_SECONDS = 0.002
_SLICE_PAUSE = 0.0002
_SLICE_KEYS = 64  # content ids settled between slice checks
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_WAL_WRITE_LOCK = 120  # SQLite's WAL write lock: this byte of the -shm file


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
_SQL_HELD_PRESENT = (
    "SELECT EXISTS(SELECT 1 FROM leases WHERE cid = :cid AND lid = :lid "
    "AND (expires_at IS NULL OR expires_at > :now)), "
    "EXISTS(SELECT 1 FROM content WHERE cid = :cid)"
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


# The owners whose leases and holds end together: an SQL predicate over the
# ``owner`` column of leases and holds, and its arguments.
_Owners = tuple[str, tuple[Any, ...]]


class _IndexRoom:
    """The verbs of :class:`blobleases.engine.EndAdapter` (the room verbs
    and the end of one lease or reader hold) and of
    :class:`blobleases.engine.OwnerEnds` (leases and holds found and ended
    a batch per statement; owners are :data:`_Owners` selections) over the
    index, inside the write transaction ``tx`` (keys: content ids as text).
    What ends (ttl expiry, a dead owner's rows), what happens to content
    left unreferenced and the eviction plan are the engine's; the index
    only finds and deletes rows."""

    __slots__ = ("db", "storage", "tx")

    def __init__(self, storage: _Leases, tx: _Tx) -> None:
        self.storage, self.tx, self.db = storage, tx, tx.db

    def unreferenced_size(self, key: str) -> int | None:
        if self.db.execute(_SQL_REFERENCED, {"cid": key, "now": self.tx.now}).fetchone()[0]:
            return None
        row = self.db.execute(_SQL_CONTENT, (key,)).fetchone()
        return None if row is None or row[1] is not None else int(row[0])

    def remove_lease(self, key: str, lid: LeaseId) -> bool:
        db = self.db
        if not db.execute("DELETE FROM leases WHERE cid = ? AND lid = ?", (key, str(lid))).rowcount:
            return False
        return not db.execute(_SQL_REFERENCED, {"cid": key, "now": self.tx.now}).fetchone()[0]

    def remove_hold(self, hold: int) -> str | None:
        db = self.db
        rows = db.execute("DELETE FROM holds WHERE id = ? RETURNING cid", (hold,)).fetchall()
        if not rows:
            return None
        key = str(rows[0][0])
        if db.execute(_SQL_REFERENCED, {"cid": key, "now": self.tx.now}).fetchone()[0]:
            return None
        return key

    # A batch holds the rows' (cid, lid) text as it is: nothing reads a lease id in it.

    def expired_batch(self, now: float, limit: int) -> list[tuple[str, str]]:
        return self.db.execute(
            "SELECT cid, lid FROM leases WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?",
            (now, limit),
        ).fetchall()

    def remove_leases(self, batch: list[tuple[str, str]]) -> list[str]:
        if not batch:
            return []
        pairs = ", ".join(["(?, ?)"] * len(batch))
        self.db.execute(
            "DELETE FROM leases WHERE (cid, lid) IN "
            f"(SELECT column1, column2 FROM (VALUES {pairs}))",
            [part for row in batch for part in row],
        )
        return list(dict.fromkeys(key for key, _ in batch))

    def owner_leases(self, owner: _Owners, limit: int) -> list[tuple[str, str]]:
        where, args = owner
        return self.db.execute(
            f"SELECT cid, lid FROM leases WHERE ({where}) AND detached = 0 LIMIT ?", (*args, limit)
        ).fetchall()

    def owner_holds(self, owner: _Owners, limit: int) -> list[int]:
        where, args = owner
        rows = self.db.execute(f"SELECT id FROM holds WHERE ({where}) LIMIT ?", (*args, limit))
        return [int(row[0]) for row in rows]

    def remove_holds(self, holds: list[int]) -> list[str]:
        if not holds:
            return []
        marks = ", ".join("?" * len(holds))
        rows = self.db.execute(f"DELETE FROM holds WHERE id IN ({marks}) RETURNING cid", holds)
        return list(dict.fromkeys(str(row[0]) for row in rows))

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
        return int(self.db.execute(index_sql.RETAINED_BYTES).fetchone()[0])

    def retained_oldest_first(self) -> Iterator[tuple[str, int]]:
        return iter(self.db.execute(_SQL_RETAINED_IN_ORDER))

    def evictable_oldest_first(self) -> Iterator[tuple[str, int, bool]]:
        # Content with a reader (a hold) is never a candidate.
        cursor = self.db.execute(index_sql.EVICTABLE_IN_ORDER)
        return ((key, size, False) for key, size in cursor)

    def total_bytes(self) -> int:
        return int(self.db.execute(index_sql.TOTAL_BYTES).fetchone()[0])


class _Index(_Locks):
    """The index connection of a handle (one per process) and its write
    transactions."""

    if TYPE_CHECKING:  # defined by the layers above

        def _auto_reap(self) -> None: ...

        def _expire(self, tx: _Tx) -> int: ...

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

    def _discard_placed(self, cid: ContentId, key: str) -> None:
        """Undo a rename whose transaction failed: unlink the file unless a
        row (of another store) names it."""
        with self._lock:
            if self._db is not None and self._db_pid == os.getpid():
                self._unlink_unreferenced(self._db, [key])

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
