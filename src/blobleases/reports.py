"""The plain records that storages return: blob and lease facts and reports."""

from __future__ import annotations

from dataclasses import dataclass, field

from .content_id import ContentId
from .lease_id import LeaseId

__all__ = [
    "BlobInfo",
    "CollectReport",
    "LeaseInfo",
    "ReaderInfo",
    "StorageStats",
    "VerifyReport",
    "WhyReport",
]


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """What a storage knows of one blob. Times are seconds since the epoch."""

    content_id: ContentId
    size: int
    lease_count: int
    reader_count: int
    created: float
    last_access: float


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """One held lease. ``expires_at`` is None for a lease without a ttl.

    ``created_at``: when the lease was taken (None where the backend does
    not record it). ``host``: the machine (and pid namespace) whose pid
    ``pid`` is, where the backend knows it. ``local``: whether ``pid`` is a
    pid of this machine and pid namespace, so it can be looked up here.
    """

    lease_id: LeaseId
    content_id: ContentId
    pid: int
    expires_at: float | None
    detached: bool = False
    created_at: float | None = None
    host: str | None = None
    local: bool = True


@dataclass(frozen=True, slots=True)
class ReaderInfo:
    """The open readers of one process on one blob. ``pid`` is None where
    the backend counts readers but does not know whose they are."""

    pid: int | None
    count: int
    host: str | None = None
    local: bool = True


@dataclass(frozen=True, slots=True)
class WhyReport:
    """Why one blob is present: every lease and open reader holding it, and
    whether retention alone keeps it (``retained``: present, unreferenced,
    kept as cache under ``retain_bytes``)."""

    info: BlobInfo
    leases: tuple[LeaseInfo, ...]
    readers: tuple[ReaderInfo, ...]
    retained: bool

    @property
    def content_id(self) -> ContentId:
        """The blob's id."""
        return self.info.content_id


@dataclass(slots=True)
class CollectReport:
    """What one ``collect()`` freed."""

    leases_reaped: int = 0
    readers_reaped: int = 0
    processes_reaped: int = 0
    blobs_deleted: int = 0
    bytes_freed: int = 0
    files_removed: int = 0
    rows_removed: int = 0

    @property
    def blobs_freed(self) -> int:
        """The same as ``blobs_deleted``."""
        return self.blobs_deleted

    def __bool__(self) -> bool:
        return any(
            (
                self.leases_reaped,
                self.readers_reaped,
                self.processes_reaped,
                self.blobs_deleted,
                self.bytes_freed,
                self.files_removed,
                self.rows_removed,
            )
        )


@dataclass(slots=True)
class VerifyReport:
    """What ``verify()`` found wrong; falsy when nothing is wrong.

    ``corrupted``: blobs whose bytes do not hash to their id (or have the wrong
    size); ``missing``: blobs the index knows but whose bytes are gone;
    ``orphaned``: stored bytes no index entry names (paths or keys, as text).
    ``repaired`` is True when ``verify(repair=True)`` removed what it found.
    ``index_errors``: what is wrong with the index itself (a DirectoryStorage's
    SQLite file), one line each; nothing is checked or repaired through a
    broken index.
    """

    checked: int = 0
    corrupted: list[ContentId] = field(default_factory=list)
    missing: list[ContentId] = field(default_factory=list)
    orphaned: list[str] = field(default_factory=list)
    repaired: bool = False
    index_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong (the report is then falsy)."""
        return not self

    def __bool__(self) -> bool:
        return bool(self.corrupted or self.missing or self.orphaned or self.index_errors)


@dataclass(frozen=True, slots=True)
class StorageStats:
    """Totals of a storage at one moment.

    ``processes`` counts live processes holding leases or readers;
    ``dedup_hits`` counts stores that found their content already present.
    """

    blobs: int
    bytes: int
    leases: int
    processes: int
    dedup_hits: int
    readers: int = 0
    retained_blobs: int = 0
    retained_bytes: int = 0
    #: Blobs (and their bytes) evicted to make room under ``max_bytes``, by
    #: any process, since the store was made (where the backend counts them).
    evictions: int = 0
    evicted_bytes: int = 0
