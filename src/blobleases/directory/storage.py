""":class:`DirectoryStorage`: the embedded default store (see
:mod:`blobleases.directory`), its construction and its backend methods, over
the layout, lock, index and lease layers it inherits."""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import shutil
import sqlite3
import stat as stat_module
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as _wait_futures
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .. import file_pool, forksafe, ingest
from ..content_id import ContentId, new_hasher
from ..engine import Engine
from ..errors import ContentNotFound, IntegrityError, StorageError
from ..lease_id import LeaseId
from ..liveness import (
    START_TIME_TOLERANCE,
    OwnerLock,
    can_judge_pids,
    pid_scope,
    process_start_time,
)
from ..reader import BlobReader, BufferSource
from ..storage import BlobStorage, FileSource
from .index import (
    _SQL_EXPIRED,
    _SQL_HELD,
    _SQL_HELD_ONLY,
    _SQL_HELD_PRESENT,
    _index_errors,
    _IndexRoom,
    _is_busy,
)
from .layout import (
    _HEX64,
    _INDEX,
    _SHM_BASE,
    _SHM_NAME,
    _check_dir_stat,
    _check_root_path,
    _error,
    _frees,
    _is_full,
    _mmap_source,
    _read_exact,
    _remove_tree,
    _shard_cap,
    _write_all,
)
from .locks import _INHERITED, _finish_at_exit, _fork_lock, _WriterLock
from .maintenance import _Maintenance

# store_bytes of at least this many bytes hashes in a worker thread while the
# temporary file is written (below it, the hand-off costs more than it saves)
_OVERLAP_MIN = 256 << 10

# A blob of at most this many bytes is stored in one transaction that writes
# its temporary file too (no look-up before it; a dedup hit writes nothing).
# Bigger blobs are written before their transaction, outside the write lock.
_SMALL_STORE = 16 << 10

# close() ends at most this many expired leases (bounded work at exit)
_CLOSE_EXPIRE_LIMIT = 2000


class DirectoryStorage(_Maintenance, BlobStorage):
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

    @property
    def read_only(self) -> bool:
        """True when this handle opened the store read-only (its root or
        index is not writable here): it lists, reads and verifies; every
        change raises StorageError. Its leases and readers are held in this
        process only (nothing can be recorded in the store)."""
        return self._read_only

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

    @_frees
    @_index_errors
    def _release_hold(self, hold: int, key: str) -> None:
        if self._deferred(self._release_hold, hold, key):
            return
        with self._lock:
            if self._closed or self._db_pid != os.getpid():
                return  # a closed store's holds end when the process is reaped
            with self._write() as tx:
                self._engine.end_hold(_IndexRoom(self, tx), hold)

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
                self._engine.end_lease(_IndexRoom(self, tx), key, lid)
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
                self._end_owners(tx, stale, args)
            tx.db.execute(
                "INSERT OR REPLACE INTO processes(scope, pid, start, seen) VALUES (?, ?, ?, ?)",
                (self._scope, pid, start, tx.now),
            )

    @_frees
    @_index_errors
    def _advise_pid_terminated(self, pid: int) -> None:
        with self._write() as tx:
            args = (pid, self._scope)
            self._end_owners(tx, self._OWNERS_OF_PID, args)
            # pid owners go; a lock owner's row stays until a reap finds it dead
            tx.db.execute(
                "DELETE FROM owners WHERE pid = ? AND scope = ? AND owner LIKE 'pid:%'", args
            )
            tx.db.execute("DELETE FROM processes WHERE scope = ? AND pid = ?", (self._scope, pid))

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
