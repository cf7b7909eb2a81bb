"""The exceptions blobleases raises.

Every error is a :class:`BlobLeaseError`. Errors about bad values are also
:class:`ValueError` so callers that validate input can catch the builtin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .content_id import ContentId
    from .lease_id import LeaseId

__all__ = [
    "BlobLeaseError",
    "ContentNotFound",
    "IntegrityError",
    "InvalidContentId",
    "InvalidLeaseId",
    "LeaseExpired",
    "StorageAlreadyInitialized",
    "StorageError",
    "StorageNotInitialized",
    "StoreFull",
]


class BlobLeaseError(Exception):
    """Base class of every error raised by blobleases."""


class LeaseExpired(BlobLeaseError):
    """The lease is not held: never made, dropped, expired, reaped or evicted."""

    def __init__(
        self,
        message: str,
        *,
        lease_id: LeaseId | None = None,
        content_id: ContentId | None = None,
    ) -> None:
        super().__init__(message)
        self.lease_id = lease_id
        self.content_id = content_id


class ContentNotFound(BlobLeaseError):
    """No content with this id is present in the storage."""

    def __init__(self, content_id: ContentId, message: str | None = None) -> None:
        super().__init__(message or f"content not found: {content_id}")
        self.content_id = content_id


class IntegrityError(BlobLeaseError):
    """Data does not hash to its content id, or its size is wrong."""


class StoreFull(BlobLeaseError):
    """Storing would exceed ``max_bytes`` and the policy refuses (nothing changed)."""


class StorageNotInitialized(BlobLeaseError):
    """No storage has been registered with :func:`blobleases.register_storage`."""


class StorageAlreadyInitialized(BlobLeaseError):
    """A different storage is already registered in this process."""


class InvalidContentId(BlobLeaseError, ValueError):
    """Text that is not a content id (``sha256-<64 hex>``)."""


class InvalidLeaseId(BlobLeaseError, ValueError):
    """Text that is not a lease id (``lease:pid=<pid>,<uuid>``)."""


class StorageError(BlobLeaseError):
    """A backend or operating-system failure; the cause is chained."""
