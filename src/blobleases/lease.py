"""BlobLease: the handle most users hold, and what pickling one sends.

A lease handle ends its lease exactly once: on ``close()``, ``with`` exit,
garbage collection or interpreter exit (detached leases only on ``close()``),
and only in the process that made it: a forked child never ends its parent's
leases. Pickling sends the content id and the store's url, never the bytes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .content_id import ContentId, as_buffer
from .errors import BlobLeaseError, ContentNotFound, IntegrityError, LeaseExpired
from .lease_id import LeaseId
from .reader import BlobReader
from .storage import BlobStorage

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
        self._storage = storage
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
        return self._storage

    @property
    def detached(self) -> bool:
        return self._detached

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise LeaseExpired(
                f"lease {self._lease_id} on {self._content_id} is closed",
                lease_id=self._lease_id,
                content_id=self._content_id,
            )

    def get_data(self) -> bytes:
        """The blob's bytes (LeaseExpired once the lease is closed or ended)."""
        self._check_open()
        return self._storage.get_data(self._content_id, self._lease_id)

    def get_reader(self) -> BlobReader:
        """A reader that holds the blob until it is closed."""
        self._check_open()
        return self._storage.get_reader(self._content_id, self._lease_id)

    def clone(self) -> BlobLease:
        """A new, independent lease on the same content."""
        lid = self._lease_again(None, False)
        return BlobLease(self._storage, self._content_id, lid, self._size)

    def transfer(self) -> LeaseTicket:
        """Make a detached transfer lease now (ttl ``transfer_ttl``) and return
        a small picklable ticket that loads as a BlobLease in the receiver.
        The content survives even if this lease is closed right after."""
        lid = self._lease_again(self._storage.policies.transfer_ttl, True)
        url = self._storage.url if self._storage.shareable else None
        return LeaseTicket(str(self._content_id), url, self._size, str(lid))

    def _lease_again(self, ttl: float | None, detached: bool) -> LeaseId:
        """Take a new lease id on this content (LeaseExpired if this lease is
        closed or its content is gone)."""
        self._check_open()
        lid = LeaseId.new()
        try:
            self._storage.lease_by_content(self._content_id, lid, ttl=ttl, detached=detached)
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
        if os.getpid() == self._pid:
            self._storage.advise_lease_dropped(self._lease_id, self._content_id)

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
        return f"<BlobLease {self._content_id} {self._lease_id} size={self._size}{state}>"


@dataclass(frozen=True, slots=True)
class LeaseTicket:
    """What a pickled lease carries: the content id, the store's url (None
    for a process-local store), the size and the transfer lease's id."""

    content_id: str
    url: str | None
    size: int
    transfer_lease_id: str

    def load(self) -> BlobLease:
        """A new lease on the content in this process."""
        return _load_lease(self.content_id, self.url, self.size)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_load_lease, (self.content_id, self.url, self.size))


def _load_lease(content_id: str, url: str | None, size: int) -> BlobLease:
    from .registry import storage_for_url

    storage = storage_for_url(url)
    cid = ContentId.parse(content_id)
    lid = LeaseId.new()
    size = storage._lease_by_content(cid, lid, None, False)
    return BlobLease(storage, cid, lid, size)


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
