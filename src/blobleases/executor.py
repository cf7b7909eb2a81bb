"""LeaseExecutor: a ProcessPoolExecutor whose arguments and results travel
by lease (SPEC section 7).

Each task is pickled by :func:`~blobleases.dumps` in the caller at
``submit`` and sent to a real :class:`~concurrent.futures.ProcessPoolExecutor`
as a small trampoline call: the worker loads the payload (large buffers are
zero-copy views of blobs), calls the function and dumps the result into the
same store; the caller's result thread loads it (zero-copy again) before the
future completes. Everything else (processes, queues, ``map`` chunks,
shutdown, broken pools) is the stdlib's own code.

Private stores (``storage=None``) live in ``/dev/shm/blobleases-<uid>/``
(``shm://executor-<pid>-<hex>``) when tmpfs has room, else in the temporary
directory (``blobleases-executor-<pid>-<hex>/store``). Each has a lock file
(``<name>.lock`` beside the shm store, ``owner.lock`` in the temporary
directory) on which its creating process holds a POSIX ``fcntl`` lock for
the store's life: the kernel drops it when that process dies, however it
dies, and never hands it to a forked child. A new executor removes every
private store whose lock it can take.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import pickle
import re
import shutil
import sys
import tempfile
import threading
import traceback
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial
from typing import Any

from .content_id import ContentId
from .directory import DirectoryStorage
from .errors import BlobLeaseError, LeaseExpired
from .lease import BlobLease
from .lease_id import LeaseId
from .pickling import dump_payload, dumps, loads
from .registry import storage_for_url
from .storage import BlobStorage

__all__ = ["LeaseExecutor", "remove_stale_stores"]

_SHM_BASE = "/dev/shm"
_SHM_PREFIX = "executor-"
_TMP_PREFIX = "blobleases-executor-"
_LOCK_SUFFIX = ".lock"
_TMP_LOCK = "owner.lock"
_TMP_STORE = "store"
#: A private store goes to /dev/shm only if it has at least this much free.
SHM_MIN_FREE = 1 << 30
_NAME = re.compile(r"[1-9][0-9]*-[0-9a-f]{16}")

# Lock files of the private stores this process made: never opened by the
# stale scan (closing any descriptor of a file drops this process's fcntl
# locks on it).
_OWN_LOCKS: set[str] = set()
_OWN_LOCK = threading.Lock()

# The storage each executor of this process uses, by a random token, so the
# caller loads results into that very handle.
_CALLER_STORES: weakref.WeakValueDictionary[str, BlobStorage] = weakref.WeakValueDictionary()


def _reinit_after_fork() -> None:
    global _OWN_LOCK
    _OWN_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_reinit_after_fork)


def _shm_base() -> str:
    return os.path.join(_SHM_BASE, f"blobleases-{os.geteuid()}")


def _shm_has_room() -> bool:
    try:
        st = os.statvfs(_SHM_BASE)
    except OSError:
        return False
    return os.access(_SHM_BASE, os.W_OK | os.X_OK) and st.f_bavail * st.f_frsize >= SHM_MIN_FREE


def _try_lock(path: str) -> int | None:
    """An fd of lock file ``path`` with this process's exclusive fcntl lock
    on it, or None if another live process holds it (or it is gone)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale_stores() -> list[str]:
    """Remove the private stores of executors whose process is gone (killed,
    or the machine lost power before it could clean up); returns their
    paths. Stores of live processes, this one's included, are left alone."""
    removed: list[str] = []
    candidates: list[tuple[str, str]] = []  # (lock file, what to remove)
    base = _shm_base()
    with contextlib.suppress(OSError):
        for entry in os.listdir(base):
            if entry.startswith(_SHM_PREFIX) and entry.endswith(_LOCK_SUFFIX):
                name = entry[len(_SHM_PREFIX) : -len(_LOCK_SUFFIX)]
                if _NAME.fullmatch(name):
                    store = os.path.join(base, entry[: -len(_LOCK_SUFFIX)])
                    candidates.append((os.path.join(base, entry), store))
    tmp = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for entry in os.listdir(tmp):
            if entry.startswith(_TMP_PREFIX) and _NAME.fullmatch(entry[len(_TMP_PREFIX) :]):
                top = os.path.join(tmp, entry)
                candidates.append((os.path.join(top, _TMP_LOCK), top))
    for lock, store in candidates:
        with _OWN_LOCK:
            if lock in _OWN_LOCKS:
                continue
        fd = _try_lock(lock)
        if fd is None:
            continue
        try:
            if os.path.isdir(store) and not os.path.islink(store):
                shutil.rmtree(store, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(lock)  # (already gone with the temporary directory)
            removed.append(store)
        finally:
            os.close(fd)
    return removed


class _PrivateStore:
    """A store of one executor, with its owner lock; :meth:`remove` (once,
    from any thread, only in the creating process) deletes everything."""

    def __init__(self) -> None:
        from .directory import DirectoryStorage

        name = f"{os.getpid()}-{uuid.uuid4().hex[:16]}"
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._removed = False
        storage: DirectoryStorage
        if _shm_has_room():
            base = _shm_base()
            with contextlib.suppress(FileExistsError):
                os.mkdir(base, 0o700)
            self._lock_path = os.path.join(base, _SHM_PREFIX + name + _LOCK_SUFFIX)
            self._top = os.path.join(base, _SHM_PREFIX + name)
            self._lock_fd = self._make_lock()
            try:
                storage = DirectoryStorage.shared_memory(_SHM_PREFIX + name)
            except BaseException:
                self._unlock()
                raise
        else:
            self._top = tempfile.mkdtemp(prefix=_TMP_PREFIX + name[: name.index("-") + 1])
            # mkdtemp's random tail is not ours: rename to the scanned form
            wanted = os.path.join(os.path.dirname(self._top), _TMP_PREFIX + name)
            os.rename(self._top, wanted)
            self._top = wanted
            self._lock_path = os.path.join(wanted, _TMP_LOCK)
            self._lock_fd = self._make_lock()
            try:
                storage = DirectoryStorage(os.path.join(wanted, _TMP_STORE))
            except BaseException:
                self._unlock()
                raise
        storage._use_file_pool()
        storage.default_algorithm = (  # type: ignore[attr-defined]
            "blake3" if importlib.util.find_spec("blake3") is not None else "sha256"
        )
        self.storage: BlobStorage = storage

    def _make_lock(self) -> int:
        fd = os.open(
            self._lock_path,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with _OWN_LOCK:
            _OWN_LOCKS.add(self._lock_path)
        return fd

    def _unlock(self) -> None:
        shutil.rmtree(self._top, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(self._lock_path)
        os.close(self._lock_fd)
        with _OWN_LOCK:
            _OWN_LOCKS.discard(self._lock_path)

    def remove(self) -> None:
        if os.getpid() != self._pid:
            return
        with self._lock:
            if self._removed:
                return
            self._removed = True
        with contextlib.suppress(Exception):
            self.storage.close()
        self._unlock()


class _Cleanup:
    """Removes a private store once no thread of its executor can use it:
    at once when the executor's result thread is done, else after it."""

    def __init__(self, private: _PrivateStore | None) -> None:
        self.private = private
        self.thread: threading.Thread | None = None

    def now(self) -> None:
        if self.private is not None:
            self.private.remove()

    def when_idle(self) -> None:
        thread = self.thread
        if thread is None or not thread.is_alive() or thread is threading.current_thread():
            self.now()
            return

        def wait_then_remove() -> None:
            thread.join()
            self.now()

        threading.Thread(target=wait_then_remove, name="blobleases-executor-cleanup").start()


class _Result:
    """What a worker returns: loading it in the caller loads the result."""

    __slots__ = ("payload", "token", "url")

    def __init__(self, token: str, url: str, payload: bytes) -> None:
        self.token, self.url, self.payload = token, url, payload

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_load_result, (self.token, self.url, self.payload))


def _load_result(token: str, url: str, payload: bytes) -> Any:
    storage = _CALLER_STORES.get(token)
    return loads(payload, storage=storage if storage is not None else storage_for_url(url))


def _run_task(
    token: str, url: str, algorithm: str, min_size: int, private: bool, payload: bytes
) -> _Result:
    """The trampoline run in a worker."""
    storage = _CALLER_STORES.get(token)  # a forked worker has the caller's handle
    if storage is None:
        storage = storage_for_url(url)
        if private and isinstance(storage, DirectoryStorage):
            storage._use_file_pool()  # as the caller's handle of a private store
    try:
        fn, args, kwargs = loads(payload, storage=storage)
    except LeaseExpired:
        raise  # content gone: this one task fails, never the pool
    except BaseException:
        # As in ProcessPoolExecutor, where a task that cannot be unpickled
        # kills its worker: the traceback on stderr, and a broken pool.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    result = fn(*args, **kwargs)
    del fn, args, kwargs  # the argument views end their leases now
    return _Result(
        token, url, dumps(result, storage=storage, min_size=min_size, algorithm=algorithm)
    )


def _transfers(payload: bytes) -> list[tuple[str, str]]:
    """(content id, transfer lease id) of each blob a dumps payload names."""
    blobs = pickle.loads(payload)[2]
    return [(cid, lid) for cid, lid, _ticket in blobs]


def _end_transfers(
    storage: BlobStorage, transfers: list[tuple[str, str]], future: Future[Any]
) -> None:
    """A task's done callback: end the transfer leases its worker did not
    take over (cancelled, failed before loading, or a broken pool); a no-op
    for those it did."""
    if not future.cancelled() and future.exception() is None:
        return  # the worker loaded the payload, which ended them all
    for cid, lid in transfers:
        with contextlib.suppress(BlobLeaseError, ValueError):
            storage.advise_lease_dropped(LeaseId.parse(lid), ContentId.parse(cid))


class LeaseExecutor(ProcessPoolExecutor):
    """A :class:`~concurrent.futures.ProcessPoolExecutor` whose arguments and
    results travel through :func:`~blobleases.dumps` / :func:`~blobleases.loads`.

    Arguments are pickled in the caller at :meth:`submit` (a later change to
    an argument does not reach the task; an argument that cannot be pickled
    fails the future, as in the stdlib); every buffer of at least
    ``min_size`` bytes is stored once in :attr:`storage` and mapped
    zero-copy (read-only) by the worker, and large results are mapped
    zero-copy by the caller. The same array passed to many tasks is stored
    once (the executor holds the blobs of the last task submitted until the
    next submit, or shutdown, so that tasks which finish between two submits
    do not free an array the next one passes again). A task's tickets and
    leases end when its future completes or is cancelled.

    ``storage=None`` makes a private store (RAM-backed ``shm://`` when
    ``/dev/shm`` has at least :data:`SHM_MIN_FREE` free, else a temporary
    directory) hashed with blake3 when installed (sha256 otherwise): it is
    removed entirely at :meth:`shutdown` (after the running tasks when
    ``wait=False``), when the executor is garbage-collected, and at
    interpreter exit, even if workers were SIGKILLed; results already
    loaded stay valid (their files stay mapped). A private store left by a
    killed process is removed by the next LeaseExecutor. A given
    ``storage`` must be shared between processes (not ``memory://``), is
    used with its ``default_algorithm`` (sha256 if it names none) and is
    never closed by the executor.

    Everything else is ProcessPoolExecutor's: ``map`` with ``timeout`` and
    ``chunksize``, ``shutdown(wait, cancel_futures)``, the context manager,
    exceptions re-raised in the caller with the worker's traceback, and
    ``BrokenProcessPool`` when a worker dies.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        storage: BlobStorage | None = None,
        min_size: int = 65536,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
    ) -> None:
        if storage is not None and not isinstance(storage, BlobStorage):
            raise TypeError(f"storage must be a BlobStorage or None, not {type(storage).__name__}")
        if isinstance(min_size, bool) or not isinstance(min_size, int):
            raise TypeError(f"min_size must be an int, not {type(min_size).__name__}")
        if min_size < 0:
            raise ValueError(f"min_size must be >= 0, not {min_size}")
        if storage is not None and storage.url.lower().startswith("memory://"):
            raise ValueError(
                "storage must be shared between processes (a path, shm://NAME, redis://...), "
                "not memory://, which is process-local"
            )
        super().__init__(
            max_workers,
            mp_context,
            initializer,
            initargs,
            max_tasks_per_child=max_tasks_per_child,
        )
        private: _PrivateStore | None = None
        if storage is None:
            with contextlib.suppress(OSError):
                remove_stale_stores()
            private = _PrivateStore()
            storage = private.storage
        self._storage = storage
        self._url = storage.url
        self._min_size = min_size
        algorithm = getattr(storage, "default_algorithm", None)
        self._algorithm = algorithm if isinstance(algorithm, str) else "sha256"
        self._token = uuid.uuid4().hex
        _CALLER_STORES[self._token] = storage
        self._held: list[BlobLease] = []
        self._bridge_lock = threading.Lock()
        self._cleanup = _Cleanup(private)
        self._finalizer = weakref.finalize(self, self._cleanup.when_idle)

    @property
    def storage(self) -> BlobStorage:
        """The store that arguments and results travel through."""
        return self._storage

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if getattr(self, "_broken", False) or getattr(self, "_shutdown_thread", False):
            # what super().submit raises, before anything is stored
            return super().submit(fn, *args, **kwargs)
        held: list[BlobLease] = []
        try:
            payload = dump_payload(
                (fn, args, kwargs),
                storage=self._storage,
                min_size=self._min_size,
                algorithm=self._algorithm,
                held=held,
            )
        except Exception as exc:
            # As ProcessPoolExecutor: a task that cannot be pickled fails its future.
            failed: Future[Any] = Future()
            failed.set_exception(exc)
            return failed
        transfers = _transfers(payload)
        try:
            future = super().submit(
                _run_task,
                self._token,
                self._url,
                self._algorithm,
                self._min_size,
                self._cleanup.private is not None,
                payload,
            )
        except BaseException:
            for cid, lid in transfers:
                with contextlib.suppress(BlobLeaseError):
                    self._storage.advise_lease_dropped(LeaseId.parse(lid), ContentId.parse(cid))
            for lease in held:
                with contextlib.suppress(BlobLeaseError):
                    lease.close()
            raise
        self._cleanup.thread = getattr(self, "_executor_manager_thread", None)
        self._bridge(held)
        if transfers:
            future.add_done_callback(partial(_end_transfers, self._storage, transfers))
        return future

    def _bridge(self, held: list[BlobLease]) -> None:
        """Hold the blobs of the last task submitted (``held``: the leases
        its pickling took) until the next submit has pickled its own: the
        same array passed to task after task (a ``map`` over one array) is
        then a dedup hit every time, even when a worker ends the previous
        task's hold before the next submit."""
        with self._bridge_lock:
            old, self._held = self._held, held
        for lease in old:
            with contextlib.suppress(BlobLeaseError):
                lease.close()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        thread = getattr(self, "_executor_manager_thread", None)
        if thread is not None:
            self._cleanup.thread = thread
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
        self._bridge([])
        if wait:
            self._cleanup.now()
        else:
            self._cleanup.when_idle()
