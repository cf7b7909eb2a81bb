"""BlobLease: the handle most users hold, and what pickling one sends.

A lease handle ends its lease exactly once: on ``close()``, ``with`` exit,
garbage collection or interpreter exit (detached leases only on ``close()``),
and only in the process that made it: a forked child never ends its parent's
leases. Pickling sends the content id and the store's url, never the bytes.

Handing a lease over: ``transfer()`` (and pickling) makes a detached
transfer lease with ttl ``transfer_ttl`` and returns a :class:`LeaseTicket`.
Loading the ticket takes the receiver's lease and ends the transfer lease in
one atomic step (:meth:`BlobStorage.take_over_lease`), so a ticket is
single-use and the bytes go as soon as their last real holder lets go.
Loading never raises: a ticket whose content is gone, or whose store cannot
be opened here, loads as a lease whose every use raises LeaseExpired saying
why, so a pool worker that unpickles a stale task fails that task only.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from .content_id import ContentId, as_buffer
from .errors import BlobLeaseError, ContentNotFound, IntegrityError, LeaseExpired
from .lease_id import LeaseId
from .reader import BlobReader
from .storage import BlobStorage
from .urls import without_password

__all__ = ["BlobLease", "ByValue", "LeaseTicket"]


def _end_lease(storage: BlobStorage, lease_id: LeaseId, content_id: ContentId, pid: int) -> None:
    """Finalizer: drop the lease if this is still the process that made it."""
    if os.getpid() != pid:
        return
    # The storage may be closed or gone by now: a shared store reaps the lease.
    with contextlib.suppress(BlobLeaseError):
        storage.advise_lease_dropped(lease_id, content_id)


class BlobLease:
    """A held lease on one blob: ``.content_id``, ``.lease_id``, ``.size``."""

    __slots__ = (
        "__weakref__",
        "_closed",
        "_content_id",
        "_detached",
        "_failure",
        "_finalizer",
        "_lease_id",
        "_lock",
        "_pid",
        "_size",
        "_storage",
    )

    def __init__(
        self,
        storage: BlobStorage,
        content_id: ContentId,
        lease_id: LeaseId,
        size: int,
        *,
        detached: bool = False,
    ) -> None:
        self._storage: BlobStorage | None = storage
        self._content_id = content_id
        self._lease_id = lease_id
        self._size = size
        self._detached = detached
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize[Any, BlobLease] | None = None
        if not detached:
            self._finalizer = weakref.finalize(
                self, _end_lease, storage, lease_id, content_id, self._pid
            )
        self._closed = False
        self._failure: str | None = None

    @classmethod
    def _failed(
        cls, storage: BlobStorage | None, content_id: ContentId, size: int, reason: str
    ) -> BlobLease:
        """A lease that holds nothing: every use raises LeaseExpired saying
        ``reason``; ``close()`` does nothing; ``.content_id`` and ``.size``
        answer. What loading a ticket whose content is gone gives."""
        lease = cls.__new__(cls)
        lease._storage = storage
        lease._content_id = content_id
        lease._lease_id = LeaseId.new()
        lease._size = size
        lease._detached = False
        lease._pid = os.getpid()
        lease._lock = threading.Lock()
        lease._finalizer = None
        lease._closed = False
        lease._failure = reason
        return lease

    @property
    def content_id(self) -> ContentId:
        return self._content_id

    @property
    def lease_id(self) -> LeaseId:
        return self._lease_id

    @property
    def size(self) -> int:
        """The blob's length in bytes."""
        return self._size

    @property
    def storage(self) -> BlobStorage:
        """The store this lease is held in (LeaseExpired for a lease loaded
        from a ticket whose store could not be opened here)."""
        if self._storage is None:
            raise self._expired()
        return self._storage

    @property
    def detached(self) -> bool:
        return self._detached

    @property
    def closed(self) -> bool:
        return self._closed

    def _expired(self) -> LeaseExpired:
        if self._failure is not None:
            why = f"lease on {self._content_id} holds nothing: {self._failure}"
        else:
            why = f"lease {self._lease_id} on {self._content_id} is closed"
        return LeaseExpired(why, lease_id=self._lease_id, content_id=self._content_id)

    def _check_open(self) -> BlobStorage:
        """The storage, unless this lease is closed or holds nothing (LeaseExpired)."""
        storage = self._storage
        if self._closed or self._failure is not None or storage is None:
            raise self._expired()
        return storage

    def get_data(self) -> bytes:
        """The blob's bytes (LeaseExpired once the lease is closed or ended)."""
        return self._check_open().get_data(self._content_id, self._lease_id)

    def get_reader(self) -> BlobReader:
        """A reader that holds the blob until it is closed."""
        return self._check_open().get_reader(self._content_id, self._lease_id)

    def clone(self) -> BlobLease:
        """A new, independent lease on the same content."""
        lid = self._lease_again(None, False)
        return BlobLease(self._check_open(), self._content_id, lid, self._size)

    def transfer(self) -> LeaseTicket:
        """Make a detached transfer lease now (ttl ``transfer_ttl``) and return
        a small picklable ticket that loads as a BlobLease in the receiver.
        The content survives even if this lease is closed right after.
        Loading the ticket ends the transfer lease (a ticket is single-use);
        a ticket never loaded ends at its ttl."""
        storage = self._check_open()
        ttl = storage.policies.transfer_ttl
        expires_at = time.time() + ttl  # no later than the store's own expiry
        lid = self._lease_again(ttl, True)
        return ticket_for(storage, self._content_id, self._size, lid, expires_at)

    def _lease_again(self, ttl: float | None, detached: bool) -> LeaseId:
        """Take a new lease id on this content (LeaseExpired if this lease is
        closed or its content is gone)."""
        storage = self._check_open()
        lid = LeaseId.new()
        try:
            storage.lease_by_content(self._content_id, lid, ttl=ttl, detached=detached)
        except ContentNotFound as exc:
            raise LeaseExpired(
                f"content {self._content_id} of lease {self._lease_id} is gone",
                lease_id=self._lease_id,
                content_id=self._content_id,
            ) from exc
        return lid

    def close(self) -> None:
        """End the lease (exactly once; later calls do nothing)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None and finalizer.detach() is None:
            return  # the finalizer has run (or is running): it ends the lease
        storage = self._storage
        if self._failure is None and storage is not None and os.getpid() == self._pid:
            storage.advise_lease_dropped(self._lease_id, self._content_id)

    def __enter__(self) -> BlobLease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.transfer().__reduce__()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        if self._failure is not None:
            state += f" holding nothing: {self._failure}"
        return f"<BlobLease {self._content_id} {self._lease_id} size={self._size}{state}>"


@dataclass(frozen=True, slots=True)
class LeaseTicket:
    """What a pickled lease carries: the content id, the store's url (None
    for a process-local store), the size, the transfer lease's id and its
    expiry (seconds since the epoch), the pid of the process that made it,
    and for a process-local store its url and a random id of that store
    object (such a ticket loads only in that process)."""

    content_id: str
    url: str | None
    size: int
    transfer_lease_id: str
    expires_at: float | None = None
    pid: int = 0
    local_store: str | None = None

    def load(self) -> BlobLease:
        """A new lease on the content in this process, taking over the
        transfer lease. Never raises: if the content is gone or the store
        cannot be reached, the lease's every use raises LeaseExpired."""
        return _load_lease(*self._fields())

    def _fields(self) -> tuple[Any, ...]:
        return (
            self.content_id,
            self.url,
            self.size,
            self.transfer_lease_id,
            self.expires_at,
            self.pid,
            self.local_store,
        )

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_load_lease, self._fields())


# Process-local stores that made tickets, by a random id: a ticket names the
# store object, which exists only in the process that made it.
_LOCAL_LOCK = threading.Lock()
_LOCAL_IDS: weakref.WeakKeyDictionary[BlobStorage, str] = weakref.WeakKeyDictionary()
_LOCAL_STORES: weakref.WeakValueDictionary[str, BlobStorage] = weakref.WeakValueDictionary()


def _reinit_local_lock() -> None:
    global _LOCAL_LOCK
    _LOCAL_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_reinit_local_lock)


def ticket_for(
    storage: BlobStorage, content_id: ContentId, size: int, transfer: LeaseId, expires_at: float
) -> LeaseTicket:
    """The ticket of ``transfer``, a detached transfer lease on ``content_id``
    in ``storage`` that ends at ``expires_at`` (as :meth:`BlobLease.transfer`
    makes)."""
    if storage.shareable:
        url, local = storage.url, None
    else:
        url, local = None, _local_store_id(storage)
    return LeaseTicket(str(content_id), url, size, str(transfer), expires_at, os.getpid(), local)


def _local_store_id(storage: BlobStorage) -> str:
    with _LOCAL_LOCK:
        ident = _LOCAL_IDS.get(storage)
        if ident is None:
            ident = _LOCAL_IDS[storage] = f"{storage.url} {uuid.uuid4().hex}"
            _LOCAL_STORES[ident] = storage
        return ident


def _load_lease(
    content_id: str,
    url: str | None,
    size: int,
    transfer_lease_id: str | None = None,
    expires_at: float | None = None,
    pid: int = 0,
    local_store: str | None = None,
) -> BlobLease:
    """Load a ticket (see :class:`LeaseTicket`): never raises for a ticket
    whose content is gone or whose store cannot be opened here."""
    from .registry import storage_for_url

    cid = ContentId.parse(content_id)
    storage: BlobStorage | None
    if local_store is not None:
        origin = local_store.split(" ", 1)[0]
        if pid != os.getpid():
            return BlobLease._failed(
                None,
                cid,
                size,
                f"{origin} is process-local: this ticket was made in process {pid} "
                f"and cannot be loaded in process {os.getpid()} (send a lease of a "
                "shared store such as a path or shm://NAME, or ByValue(lease))",
            )
        storage = _LOCAL_STORES.get(local_store)
        if storage is None:
            return BlobLease._failed(
                None, cid, size, f"the {origin} store that made this ticket no longer exists"
            )
    else:
        try:
            storage = storage_for_url(url)
        except Exception as exc:
            where = "the registered store" if url is None else f"the store {without_password(url)}"
            return BlobLease._failed(None, cid, size, f"cannot open {where}: {exc}")
    lid = LeaseId.new()
    try:
        got: int | None = size
        if transfer_lease_id is not None:
            got = storage.take_over_lease(cid, LeaseId.parse(transfer_lease_id), lid)
        else:  # a ticket pickled by an older version names no transfer lease
            storage.lease_by_content(cid, lid)
    except ContentNotFound:
        got = None
    except Exception as exc:
        return BlobLease._failed(
            storage, cid, size, f"cannot lease it in {without_password(storage.url)}: {exc}"
        )
    if got is None:
        if expires_at is not None and time.time() >= expires_at:
            when = datetime.fromtimestamp(expires_at, UTC).isoformat(timespec="seconds")
            reason = (
                f"the ticket's transfer lease expired at {when} (transfer_ttl) "
                "before the ticket was loaded, and nothing else held the content"
            )
        else:
            reason = (
                "the content was freed or evicted before the ticket was loaded "
                "(a ticket is single-use: a second load works only while someone "
                "still holds the content)"
            )
        return BlobLease._failed(storage, cid, size, reason)
    return BlobLease(storage, cid, lid, got)


class ByValue:
    """Wraps a lease so that pickling sends its bytes; loading stores them
    again in the receiver's registered storage and gives a BlobLease."""

    __slots__ = ("lease",)

    def __init__(self, lease: BlobLease) -> None:
        if not isinstance(lease, BlobLease):
            raise TypeError(f"lease must be a BlobLease, not {type(lease).__name__}")
        self.lease = lease

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        data = self.lease.get_data()
        return (_load_by_value, (str(self.lease.content_id), data))

    def __repr__(self) -> str:
        return f"ByValue({self.lease!r})"


def _load_by_value(content_id: str, data: bytes) -> BlobLease:
    from .registry import get_storage

    cid = ContentId.parse(content_id)
    storage = get_storage()
    lid = LeaseId.new()
    stored = storage.store_bytes(as_buffer(data), lid, algorithm=cid.algorithm)
    if stored != cid:
        storage.advise_lease_dropped(lid, stored)
        raise IntegrityError(f"bytes sent by value hash to {stored}, not {cid}")
    return BlobLease(storage, cid, lid, len(data))
