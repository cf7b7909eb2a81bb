"""AsyncBlobManager and AsyncBlobLease: lease handles for asyncio code.

Every call that touches storage (store, lease, read, drop, reader close) runs
in a bounded thread pool the manager owns, never on the event loop's thread.
That includes the paths garbage collection takes: a handle dropped unclosed
(on the loop thread, say) hands the drop of its lease or reader hold to the
pool and returns at once.

One thread pool serves every backend, RedisStorage included. RedisStorage's
work per call is Lua scripts, chunked transfers and bookkeeping that would
have to be written a second time over redis-py's asyncio client to run on
the loop, where packing and parsing megabyte chunks and hashing the bytes
would cost loop time (measured on 2 CPUs: redis-py's asyncio client stalled
the loop 60 to 300 ms during 8 concurrent GETs or SETs of 16 MiB; RedisStorage
through this pool, 6 to 30 ms during 8 concurrent stores and reads). In a
worker thread the socket waits, the hashing and the file I/O release the GIL,
so the loop keeps running.

The pool's size bounds how many storage calls run at once, and so how much
memory in flight they hold (a read of a 16 MiB blob holds its 16 MiB until
it returns); more calls queue in the order they were made. By default
(:data:`DEFAULT_MAX_WORKERS`) it has one thread per CPU this process may
run on, at most 4: hashing and copying are CPU work, and more threads than
CPUs take CPU time from the loop's thread without making the calls faster
(measured on 2 CPUs, 8 concurrent stores and reads of 16 MiB: the same
elapsed time with 2, 4 and 8 threads; the longest stall with 8 threads 2 to
3 times that with 2). The cap of 4 bounds the memory in flight on large
machines, where SQLite's single writer and Redis' single command thread
would not use more.

What could still stall the loop is the GIL. The copies of a blob's bytes on
these paths release it: readers copy a mapped or in-memory blob with
:mod:`blobleases.gil_free` (and hand a blob held as ``bytes`` over as it
is), file stores read and write with ``os.read``/``os.write`` and hash with
hashlib, which release it, and chunks are joined with ``bytes.join``, which
releases it for large results. What remains is pure-Python work in a worker,
which yields the GIL every ``sys.getswitchinterval()`` (5 ms), and, on a
loaded machine, a worker that the kernel preempts while it holds the GIL
(measured on 2 CPUs, 8 concurrent stores and reads of 16 MiB: the loop's
thread blocked at most about 5 ms in any 1 ms tick, from 25 to 85 ms before
the readers released the GIL; what is left of the longest stall is the
loop's thread waiting for a CPU, which the machine's load decides).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import threading
import traceback
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, NoReturn, Self, TypeVar

from .content_id import ContentId
from .errors import BlobLeaseError, LeaseExpired, StorageError
from .lease import BlobLease, LeaseTicket
from .lease_id import LeaseId
from .manager import BlobManager
from .reader import BlobReader, describe, unpicklable
from .storage import BlobStorage, FileSource

__all__ = ["DEFAULT_MAX_WORKERS", "AsyncBlobLease", "AsyncBlobManager", "AsyncBlobReader"]


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


DEFAULT_MAX_WORKERS = max(1, min(4, _cpus()))
"""Threads in an :class:`AsyncBlobManager`'s pool unless ``max_workers`` says:
one per CPU this process may run on, at most 4."""

_T = TypeVar("_T")


def _on_loop_thread() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _quietly(fn: Callable[[], object]) -> None:
    """Run a finalizer's storage call: a storage that is closed or gone by now
    is fine (a shared store reaps the lease); anything else is printed, as an
    exception in a ``weakref.finalize`` callback is."""
    try:
        fn()
    except BlobLeaseError:
        pass
    except Exception:
        print(f"Exception ignored while ending {fn!r}:", file=sys.stderr)
        traceback.print_exc()


class _AsyncContext:
    """``async with``: leaving the block awaits ``_leave()``."""

    __slots__ = ()

    async def _leave(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._leave()


class AsyncBlobManager(_AsyncContext):
    """Makes :class:`AsyncBlobLease` handles on a storage (default: the
    registered storage, looked up at each call, as :class:`BlobManager`).

    The methods are :class:`BlobManager`'s as coroutines. Each runs its
    storage call in this manager's pool of ``max_workers`` threads (default
    :data:`DEFAULT_MAX_WORKERS`), so the event loop never waits on file or
    network I/O. Data passed to :meth:`store` is read in a worker thread:
    do not change it until the call returns.

    ``await manager.aclose()`` (or leaving ``async with``) ends every lease
    and reader this manager handed out that is still open (detached leases
    stay in the store, as when their process exits), waits for the calls in
    flight and stops the threads. Afterwards its methods, and those of its
    handles, raise StorageError and LeaseExpired. The storage is not closed.
    A manager works in the process that made it, not in a forked child.
    """

    def __init__(
        self, storage: BlobStorage | None = None, *, max_workers: int | None = None
    ) -> None:
        if storage is not None and not isinstance(storage, BlobStorage):
            raise TypeError(f"storage must be a BlobStorage or None, not {type(storage).__name__}")
        if max_workers is None:
            max_workers = DEFAULT_MAX_WORKERS
        elif isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise TypeError(f"max_workers must be an int or None, not {type(max_workers).__name__}")
        elif max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, not {max_workers}")
        self._manager = BlobManager(storage)
        self._max_workers = max_workers
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="blobleases-aio")
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._closed = False
        self._handles: weakref.WeakSet[AsyncBlobLease | AsyncBlobReader] = weakref.WeakSet()

    @property
    def storage(self) -> BlobStorage:
        """The storage the next call uses (StorageNotInitialized if None was
        given and nothing is registered)."""
        return self._manager.storage

    @property
    def max_workers(self) -> int:
        """The most storage calls this manager runs at once."""
        return self._max_workers

    @property
    def closed(self) -> bool:
        return self._closed

    # -- running storage calls -------------------------------------------

    async def _run(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` in the pool, awaited."""
        if os.getpid() != self._pid:
            raise StorageError(
                f"this AsyncBlobManager was made in process {self._pid}: "
                f"make a new one in process {os.getpid()}"
            )
        if self._closed:
            raise StorageError("the AsyncBlobManager is closed")
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._pool, fn)
        except RuntimeError as exc:  # shut down meanwhile (aclose, interpreter exit)
            raise StorageError(f"the AsyncBlobManager cannot run calls now: {exc}") from exc
        return await future

    def _offload(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` (the end of a lease or a reader hold) off the event
        loop without waiting for it: in the pool; once the pool is shut
        down, in a new thread if this thread runs an event loop, else here.
        Nothing in a forked child: the handle belongs to its parent."""
        if os.getpid() != self._pid:
            return
        try:
            self._pool.submit(_quietly, fn)
            return
        except RuntimeError:
            pass
        if _on_loop_thread():
            try:
                threading.Thread(target=_quietly, args=(fn,), name="blobleases-aio-end").start()
                return
            except RuntimeError:
                pass
        _quietly(fn)

    def _adopt(self, handle: AsyncBlobLease | AsyncBlobReader) -> None:
        """Track a handle made in a worker thread, so that aclose() ends it;
        if the manager was closed while the call ran, end it now (here, in
        the worker) and raise StorageError."""
        with self._lock:
            if not self._closed:
                self._handles.add(handle)
                return
        handle._end_now()
        raise StorageError(
            "the AsyncBlobManager was closed while this call ran: what it made was ended"
        )

    def _lease(self, lease: BlobLease) -> AsyncBlobLease:
        """In a worker thread: wrap a new lease. Made here, an AsyncBlobLease
        whose caller was cancelled meanwhile is dropped without I/O on the
        loop (its finalizer hands the drop to the pool)."""
        handle = AsyncBlobLease(self, lease)
        self._adopt(handle)
        return handle

    def _reader(self, reader: BlobReader) -> AsyncBlobReader:
        handle = AsyncBlobReader(self, reader)
        self._adopt(handle)
        return handle

    # -- BlobManager's methods -----------------------------------------------

    async def store(
        self,
        data: Any,
        *,
        ttl: float | None = None,
        detached: bool = False,
        algorithm: str = "sha256",
    ) -> AsyncBlobLease:
        """Store bytes-like ``data`` and return a lease on it (see
        :meth:`BlobManager.store`)."""
        store = functools.partial(
            self._manager.store, data, ttl=ttl, detached=detached, algorithm=algorithm
        )
        return await self._run(lambda: self._lease(store()))

    async def store_file(
        self,
        source: FileSource,
        *,
        ttl: float | None = None,
        detached: bool = False,
        algorithm: str = "sha256",
    ) -> AsyncBlobLease:
        """Store a file (a path or binary file object, read in a worker
        thread in constant memory) and return a lease on it."""
        store = functools.partial(
            self._manager.store_file, source, ttl=ttl, detached=detached, algorithm=algorithm
        )
        return await self._run(lambda: self._lease(store()))

    async def get_by_content_id(
        self,
        content_id: ContentId | str,
        *,
        ttl: float | None = None,
        detached: bool = False,
    ) -> AsyncBlobLease:
        """A new lease on present content (ContentNotFound if absent)."""
        get = functools.partial(
            self._manager.get_by_content_id, content_id, ttl=ttl, detached=detached
        )
        return await self._run(lambda: self._lease(get()))

    # -- lifetime -------------------------------------------------------

    async def aclose(self) -> None:
        """End the open handles, wait for the calls in flight and stop the
        threads (see the class docstring). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            handles = list(self._handles)
            self._handles = weakref.WeakSet()
        loop = asyncio.get_running_loop()
        if os.getpid() == self._pid:
            ends = [loop.run_in_executor(self._pool, handle._end_now) for handle in handles]
            await asyncio.gather(*ends, return_exceptions=True)
        done: asyncio.Future[None] = loop.create_future()

        def finish(_: object) -> None:
            if not done.done():
                done.set_result(None)

        def join() -> None:
            # Waits for the calls in flight: off the loop, like every wait here.
            self._pool.shutdown(wait=True)
            with contextlib.suppress(RuntimeError):  # the loop was closed meanwhile
                loop.call_soon_threadsafe(finish, None)

        threading.Thread(target=join, name="blobleases-aio-join", daemon=True).start()
        await done

    async def _leave(self) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<AsyncBlobManager max_workers={self._max_workers}{state}>"


class _Handle(_AsyncContext):
    """What :class:`AsyncBlobLease` and :class:`AsyncBlobReader` share: the
    end of the hold (``end``, a storage call) runs exactly once, on
    ``close()``, ``async with`` exit, the manager's ``aclose()``, or in the
    pool when the handle is garbage-collected (``end_on_collect``)."""

    __slots__ = ("__weakref__", "_closed", "_end", "_finalizer", "_manager")

    def __init__(
        self, manager: AsyncBlobManager, end: Callable[[], None], end_on_collect: bool
    ) -> None:
        self._manager = manager
        self._end = end
        # None while open, else why it was closed (a suffix of the message).
        self._closed: str | None = None
        self._finalizer: weakref.finalize[Any, _Handle] | None = None
        if end_on_collect:
            # Holds the BlobLease or BlobReader, so it is never collected
            # (and its hold dropped) on the loop thread.
            self._finalizer = weakref.finalize(self, manager._offload, end)

    async def _idle(self) -> None:
        """Wait for the calls in flight that must run before the end."""

    async def _leave(self) -> None:
        await self._close()

    async def _close(self) -> None:
        if self._closed is not None:
            return
        self._closed = ""
        finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None and finalizer.detach() is None:
            return  # the finalizer ran (interpreter exit): it ended the hold
        await self._idle()
        try:
            await self._manager._run(self._end)
        except StorageError:
            # The manager was closed meanwhile: it ends its handles, or
            # (closed before this handle was made) nothing runs calls now.
            self._manager._offload(self._end)

    def _end_now(self) -> None:
        """In a worker thread, for aclose(): close the handle, and end its
        hold unless it outlives its process (a detached lease)."""
        if self._closed is not None:
            return
        self._closed = " (its AsyncBlobManager was closed)"
        finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None and finalizer.detach() is not None:
            _quietly(self._end)


class AsyncBlobLease(_Handle):
    """A held lease on one blob, for asyncio code: ``.content_id``,
    ``.lease_id``, ``.size``, ``await get_data()``, ``await get_reader()``,
    ``await clone()``, ``await transfer()``, ``await close()`` and
    ``async with``. Made by :class:`AsyncBlobManager`, whose pool runs its
    storage calls.

    The lease ends exactly once: on ``close()``, ``async with`` exit, the
    manager's ``aclose()``, or when the handle is garbage-collected (then in
    the pool, never on the loop thread), or at interpreter exit; a detached
    lease only on ``close()``. A forked child never ends it.

    Pickling sends a ticket, as pickling a :class:`BlobLease` does, and
    loads as a BlobLease. Pickling makes the transfer lease on the calling
    thread (one storage call): in a coroutine, send ``await lease.transfer()``.
    """

    __slots__ = ("_lease",)

    def __init__(self, manager: AsyncBlobManager, lease: BlobLease) -> None:
        if not isinstance(manager, AsyncBlobManager):
            raise TypeError(f"manager must be an AsyncBlobManager, not {type(manager).__name__}")
        if not isinstance(lease, BlobLease):
            raise TypeError(f"lease must be a BlobLease, not {type(lease).__name__}")
        super().__init__(manager, lease.close, end_on_collect=not lease.detached)
        self._lease = lease

    @property
    def content_id(self) -> ContentId:
        return self._lease.content_id

    @property
    def lease_id(self) -> LeaseId:
        return self._lease.lease_id

    @property
    def size(self) -> int:
        """The blob's length in bytes."""
        return self._lease.size

    @property
    def detached(self) -> bool:
        return self._lease.detached

    @property
    def closed(self) -> bool:
        """True once the lease is closed (or ended by the manager's aclose)."""
        return self._closed is not None

    @property
    def storage(self) -> BlobStorage:
        """The store this lease is held in."""
        return self._lease.storage

    @property
    def manager(self) -> AsyncBlobManager:
        """The manager whose pool runs this lease's storage calls."""
        return self._manager

    def _check_open(self) -> BlobLease:
        if self._closed is not None:
            lease = self._lease
            raise LeaseExpired(
                f"lease {lease.lease_id} on {lease.content_id} is closed{self._closed}",
                lease_id=lease.lease_id,
                content_id=lease.content_id,
            )
        return self._lease

    async def get_data(self) -> bytes:
        """The blob's bytes (LeaseExpired once the lease is closed or ended)."""
        return await self._manager._run(self._check_open().get_data)

    async def get_reader(self) -> AsyncBlobReader:
        """An :class:`AsyncBlobReader` that holds the blob until it is closed."""
        lease = self._check_open()
        return await self._manager._run(lambda: self._manager._reader(lease.get_reader()))

    async def clone(self) -> AsyncBlobLease:
        """A new, independent lease on the same content."""
        lease = self._check_open()
        return await self._manager._run(lambda: self._manager._lease(lease.clone()))

    async def transfer(self) -> LeaseTicket:
        """A picklable ticket that loads as a BlobLease in the receiver (see
        :meth:`BlobLease.transfer`), made in the pool."""
        return await self._manager._run(self._check_open().transfer)

    async def close(self) -> None:
        """End the lease (exactly once; later calls do nothing) and wait
        until the store has dropped it."""
        await self._close()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self._check_open().transfer().__reduce__()

    def __repr__(self) -> str:
        lease = self._lease
        state = "" if self._closed is None else " closed"
        return f"<AsyncBlobLease {lease.content_id} {lease.lease_id} size={lease.size}{state}>"


class AsyncBlobReader(_Handle):
    """A reader over one blob, for asyncio code: a :class:`BlobReader` whose
    every read runs in the manager's pool. ``await read(size)``, ``read1``,
    ``readinto``, ``readline``, ``seek``; ``tell()`` and ``.size`` answer at
    once; ``await close()`` and ``async with``. Calls on one reader run one
    at a time, in the order they were made.

    It holds the blob until closed, like a BlobReader; garbage-collected
    unclosed, the pool releases the hold. It has no ``getbuffer``: a view's
    pages would be read (and the hold released) on the loop thread. A
    reader cannot be pickled: send its lease.
    """

    __slots__ = ("_lock", "_reader")

    def __init__(self, manager: AsyncBlobManager, reader: BlobReader) -> None:
        if not isinstance(manager, AsyncBlobManager):
            raise TypeError(f"manager must be an AsyncBlobManager, not {type(manager).__name__}")
        if not isinstance(reader, BlobReader):
            raise TypeError(f"reader must be a BlobReader, not {type(reader).__name__}")
        super().__init__(manager, reader.close, end_on_collect=True)
        self._reader = reader
        self._lock: asyncio.Lock | None = None

    @property
    def size(self) -> int:
        """The blob's length in bytes."""
        return self._reader.size

    @property
    def closed(self) -> bool:
        """True once the reader is closed (or ended by the manager's aclose)."""
        return self._closed is not None

    def _closed_error(self) -> NoReturn:
        raise ValueError("I/O operation on closed blob reader")

    async def _call(self, fn: Callable[[], _T]) -> _T:
        if self._closed is not None:
            self._closed_error()
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._closed is not None:
                self._closed_error()
            return await self._manager._run(fn)

    async def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes from the position (all that is left if
        negative or None)."""
        return await self._call(functools.partial(self._reader.read, size))

    async def read1(self, size: int | None = -1) -> bytes:
        return await self._call(functools.partial(self._reader.read1, size))

    async def readinto(self, buffer: Any) -> int:
        """Read into a writable buffer; returns the number of bytes read."""
        return await self._call(functools.partial(self._reader.readinto, buffer))

    async def readline(self, size: int | None = -1) -> bytes:
        return await self._call(functools.partial(self._reader.readline, size))

    async def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position as ``BlobReader.seek`` does; returns it."""
        return await self._call(functools.partial(self._reader.seek, offset, whence))

    def tell(self) -> int:
        if self._closed is not None:
            self._closed_error()
        return self._reader.tell()

    async def close(self) -> None:
        """Release the reader's hold on the blob (exactly once), after the
        read in flight, and wait until the store has released it."""
        await self._close()

    async def _idle(self) -> None:
        if self._lock is not None:
            async with self._lock:  # after the read in flight
                pass

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise unpicklable(self, "await lease.transfer()")

    def __repr__(self) -> str:
        reader = self._reader
        return describe(self, reader.size, None if self._closed is not None else reader.tell())
