"""The files of a :class:`~blobleases.directory.DirectoryStorage`: the root
and what is in it, the directories under it and the descriptors a handle
keeps of them, and the reading, writing, renaming and unlinking of blob and
temporary files (see :mod:`blobleases.directory` for the layout)."""

from __future__ import annotations

import contextlib
import errno
import functools
import mmap
import os
import re
import resource
import shutil
import sqlite3
import stat as stat_module
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, NoReturn, ParamSpec, TypeVar

from .. import file_pool, ingest
from ..content_id import ALGORITHMS, ContentId, new_hasher
from ..errors import IntegrityError, StorageError
from ..lease_id import LeaseId
from ..liveness import OwnerLock
from ..reader import BufferSource
from ..storage import BlobStorage

if TYPE_CHECKING:
    from ..engine import Engine, ReapSchedule
    from .locks import _WriterLock
    from .storage import DirectoryStorage

_T = TypeVar("_T")


_INDEX = "index.sqlite3"
_MARKER = "format"
_MARKER_TEXT = b"blobleases directory store, format 1\n"
_MAX_WRITE = 1 << 30
_SQLITE_FULL = 13

# Space kept in reserve (a file in the root) so that freeing works on a full
# filesystem: 1/16 of the filesystem, between 64 KiB and 1 MiB.
_RESERVE = "reserve"
_RESERVE_MAX = 1 << 20
_RESERVE_MIN = 64 << 10

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

_MAX_ROOT_DEPTH = 256
"""The deepest store root accepted (os.makedirs recurses once per missing level)."""


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


_P = ParamSpec("_P")
_S = TypeVar("_S", bound="_Layout")


def _frees(
    method: Callable[Concatenate[_S, _P], _T],
) -> Callable[Concatenate[_S, _P], _T]:
    """For work that frees space (dropping, releasing, reaping, collecting,
    repairing): if it fails because the filesystem is full, the store's
    reserve is given back to the filesystem and the work done again, so the
    store can always free its own space. The reserve is made again once
    there is room."""

    @functools.wraps(method)
    def frees(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
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


class _Layout(BlobStorage):
    """The root, its directories (cached descriptors, looked up again when
    one was removed or replaced) and the blob, temporary and reserve files
    of a handle: what :class:`~blobleases.directory.DirectoryStorage` keeps
    on the filesystem beside its index."""

    # The state of a handle, set by DirectoryStorage._setup (every layer reads it).
    _root: str
    _url: str
    _index_path: str
    _safe: bool
    _lock: threading.RLock
    _closed: bool
    _temporary: bool
    _read_only: bool
    _owner_pid: int
    _root_key: tuple[int, int]
    _root_fd: int
    _tmp_fd: int
    _blobs_fd: int
    _owners_fd: int
    _dirs: dict[str, int]
    _shards: OrderedDict[str, int]
    _shard_cap: int
    _reserve_missing: bool
    _file_pool: file_pool.FilePool | None
    _finalizer: weakref.finalize[Any, DirectoryStorage] | None
    _db: sqlite3.Connection | None
    _db_pid: int
    _mypid: int
    _mystart: float
    _scope: str
    _owner_lock: OwnerLock | None
    _owner: str
    _owner_recorded: bool
    _writer_lock: _WriterLock | None
    _access: dict[str, float]
    _access_flush_at: float
    _sizes: dict[str, int]
    _local_leases: dict[tuple[str, str], float | None]
    _engine: Engine[str]
    _reaps: ReapSchedule
    _hasher_pool: ThreadPoolExecutor | None
    _hasher_pid: int
    _hasher_busy: threading.Lock

    if TYPE_CHECKING:  # defined by the layers above

        def _owner_token(self) -> str: ...

        def _is_held(self, cid: ContentId, lid: LeaseId) -> bool: ...

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

    @staticmethod
    def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

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

    def _rename_in(self, name: str, target: str, shard: int) -> None:
        """Move temporary file ``name`` to ``target`` in directory ``shard``."""
        os.replace(name, target, src_dir_fd=self._tmp_fd, dst_dir_fd=shard)
        if self._safe:
            os.fsync(shard)

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

    def _close_fds(self) -> None:
        fds = [*self._shards.values(), *self._dirs.values()]
        self._shards = OrderedDict()
        fds += [fd for fd in (self._owners_fd, self._root_fd) if fd >= 0]
        self._dirs = {}
        self._blobs_fd = self._tmp_fd = self._owners_fd = self._root_fd = -1
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
