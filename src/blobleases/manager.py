"""BlobManager: stores bytes and files and hands out BlobLease handles."""

from __future__ import annotations

from typing import Any

from .content_id import ContentId, as_buffer
from .lease import BlobLease
from .lease_id import LeaseId
from .registry import get_storage
from .storage import BlobStorage, FileSource

__all__ = ["BlobManager", "get_by_content_id", "store", "store_file"]


class BlobManager:
    """Makes leases on a storage (default: the registered storage, looked up
    at each call so a manager made before registration works)."""

    def __init__(self, storage: BlobStorage | None = None) -> None:
        if storage is not None and not isinstance(storage, BlobStorage):
            raise TypeError(f"storage must be a BlobStorage or None, not {type(storage).__name__}")
        self._storage = storage

    @property
    def storage(self) -> BlobStorage:
        return self._storage if self._storage is not None else get_storage()

    def store(
        self,
        data: Any,
        *,
        ttl: float | None = None,
        detached: bool = False,
        algorithm: str = "sha256",
    ) -> BlobLease:
        """Store bytes-like ``data`` (hashed once, no copy of the input) and
        return a lease on it."""
        storage = self.storage
        view = as_buffer(data)
        lid = LeaseId.new()
        cid = storage.store_bytes(view, lid, algorithm=algorithm, ttl=ttl, detached=detached)
        return BlobLease(storage, cid, lid, view.nbytes, detached=detached)

    def store_file(
        self,
        source: FileSource,
        *,
        ttl: float | None = None,
        detached: bool = False,
        algorithm: str = "sha256",
    ) -> BlobLease:
        """Store a file streamed in constant memory and return a lease on it."""
        storage = self.storage
        lid = LeaseId.new()
        cid, size = storage.store_file_with_size(source, lid, algorithm, ttl=ttl, detached=detached)
        return BlobLease(storage, cid, lid, size, detached=detached)

    def get_by_content_id(
        self,
        content_id: ContentId | str,
        *,
        ttl: float | None = None,
        detached: bool = False,
    ) -> BlobLease:
        """A new lease on present content (ContentNotFound if absent)."""
        cid = ContentId.coerce(content_id, "content_id")
        storage = self.storage
        lid = LeaseId.new()
        size = storage.lease_with_size(cid, lid, ttl=ttl, detached=detached)
        return BlobLease(storage, cid, lid, size, detached=detached)


def store(
    data: Any,
    *,
    ttl: float | None = None,
    detached: bool = False,
    algorithm: str = "sha256",
) -> BlobLease:
    """``BlobManager().store(...)`` on the registered storage."""
    return BlobManager().store(data, ttl=ttl, detached=detached, algorithm=algorithm)


def store_file(
    source: FileSource,
    *,
    ttl: float | None = None,
    detached: bool = False,
    algorithm: str = "sha256",
) -> BlobLease:
    """``BlobManager().store_file(...)`` on the registered storage."""
    return BlobManager().store_file(source, ttl=ttl, detached=detached, algorithm=algorithm)


def get_by_content_id(
    content_id: ContentId | str, *, ttl: float | None = None, detached: bool = False
) -> BlobLease:
    """``BlobManager().get_by_content_id(...)`` on the registered storage."""
    return BlobManager().get_by_content_id(content_id, ttl=ttl, detached=detached)
