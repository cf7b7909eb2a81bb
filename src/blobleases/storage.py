"""BlobStorage: the abstract storage every backend implements.

The public methods validate their arguments (a wrong type is a TypeError, a
bad value a ValueError, each naming the argument) and then call the
underscore method of the same name, which a backend implements. Each
underscore method documents what a backend must guarantee; the conformance
suite in :mod:`blobleases.testing` checks every guarantee.
"""

from __future__ import annotations

import abc
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import IO, Any

from .content_id import ContentId, as_buffer, check_algorithm
from .errors import BlobLeaseError, ContentNotFound, IntegrityError, LeaseExpired, StorageError
from .lease_id import LeaseId, check_pid
from .policies import Policies, check_detached, check_ttl
from .reader import BlobReader
from .reports import (
    BlobInfo,
    CollectReport,
    LeaseInfo,
    ReaderInfo,
    StorageStats,
    VerifyReport,
    WhyReport,
)

__all__ = ["BlobStorage", "FileSource", "SourceNotFound"]

FileSource = str | os.PathLike[str] | IO[bytes]

#: Guards every handle's operation counts (see BlobStorage.operation_counts).
_COUNTS_LOCK = threading.Lock()


def _content_id(value: object, name: str = "content_id") -> ContentId:
    if not isinstance(value, ContentId):
        raise TypeError(f"{name} must be a ContentId, not {type(value).__name__}")
    return value


def _lease_id(value: object, name: str = "lease_id") -> LeaseId:
    if not isinstance(value, LeaseId):
        raise TypeError(f"{name} must be a LeaseId, not {type(value).__name__}")
    return value


def _lease_args(
    content_id: object, lease_id: object, ttl: object, detached: object
) -> tuple[ContentId, LeaseId, float | None, bool]:
    return _content_id(content_id), _lease_id(lease_id), check_ttl(ttl), check_detached(detached)


class SourceNotFound(StorageError, FileNotFoundError):
    """The file given to ``store_file`` does not exist or is not a regular file."""


def _file_source(source: object) -> FileSource:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not isinstance(path, str):
            raise TypeError("source path must be text, not bytes")
        if not os.path.isfile(path):
            what = "is not a regular file" if os.path.exists(path) else "does not exist"
            raise SourceNotFound(f"source {path!r} {what}")
        return source
    if hasattr(source, "read"):
        return source  # type: ignore[return-value]
    raise TypeError(f"source must be a path or a binary file object, not {type(source).__name__}")


class BlobStorage(abc.ABC):
    """A content-addressed blob store whose bytes are held by leases.

    A lease is the pair (lease id, content id). Bytes live exactly as long as
    some lease or open reader holds them (or retention keeps them); leases of
    processes that die are reaped. Every method is safe to call from many
    threads (and, for shared backends, many processes) at once.
    """

    policies: Policies
    #: True when :attr:`url` opens this same store from another process, so a
    #: pickled lease can name it; False for process-local stores.
    shareable: bool = True
    #: This handle's operation counts (see operation_counts), made at the first.
    _op_counts: dict[str, int] | None = None

    def __init__(self, **policies: Any) -> None:
        self.policies = Policies(**policies)

    # -- identity ---------------------------------------------------------

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The string :func:`blobleases.open_storage` takes to open this store again."""

    # -- the seven seed methods ---------------------------------------------

    def store(
        self,
        content_id: ContentId,
        data: Any,
        lease_id: LeaseId,
        *,
        ttl: float | None = None,
        detached: bool = False,
    ) -> None:
        """Store ``data`` as ``content_id`` and hold the lease ``lease_id`` on it.

        Present content is not written again (a dedup hit). Otherwise data that
        does not hash to ``content_id`` raises IntegrityError and stores nothing.
        Storing again under a held lease is a no-op. ``ttl`` ends the lease at
        its expiry; a ``detached`` lease does not depend on its process.
        """
        cid = _content_id(content_id)
        view = as_buffer(data)
        lid, ttl_s, det = _lease_id(lease_id), check_ttl(ttl), check_detached(detached)
        try:
            self._store(cid, view, lid, ttl_s, det, False)
        except BlobLeaseError as exc:
            self._note_error(exc)
            raise
        self._note("stores")

    def lease_by_content(
        self,
        content_id: ContentId,
        lease_id: LeaseId,
        *,
        ttl: float | None = None,
        detached: bool = False,
    ) -> None:
        """Hold ``lease_id`` on ``content_id`` if present, else ContentNotFound."""
        # The common call (exact types, default options) skips the checkers.
        if (
            type(content_id) is not ContentId
            or type(lease_id) is not LeaseId
            or ttl is not None
            or detached is not False
        ):
            content_id, lease_id, ttl, detached = _lease_args(content_id, lease_id, ttl, detached)
        try:
            self._lease_by_content(content_id, lease_id, ttl, detached)
        except BlobLeaseError as exc:
            self._note_error(exc)
            raise

    def get_data(self, content_id: ContentId, lease_id: LeaseId) -> bytes:
        """The whole blob. LeaseExpired if the lease is not held; IntegrityError
        if the stored size is wrong (or, with ``verify_reads``, the hash)."""
        if type(content_id) is not ContentId or type(lease_id) is not LeaseId:
            content_id, lease_id = _content_id(content_id), _lease_id(lease_id)
        try:
            return self._get_data(content_id, lease_id)
        except BlobLeaseError as exc:
            self._note_error(exc)
            raise

    def get_reader(self, content_id: ContentId, lease_id: LeaseId) -> BlobReader:
        """A reader over the blob that holds it until closed (same errors as get_data)."""
        cid, lid = _content_id(content_id), _lease_id(lease_id)
        try:
            return self._get_reader(cid, lid)
        except BlobLeaseError as exc:
            self._note_error(exc)
            raise

    def advise_lease_dropped(self, lease_id: LeaseId, content_id: ContentId) -> None:
        """End the lease; a no-op if it is not held. Unreferenced content is
        deleted at once unless retention keeps it."""
        if type(content_id) is not ContentId or type(lease_id) is not LeaseId:
            content_id, lease_id = _content_id(content_id), _lease_id(lease_id)
        try:
            self._advise_lease_dropped(lease_id, content_id)
        except BlobLeaseError as exc:
            self._note_error(exc)
            raise

    def advise_of_pid(self, pid: int) -> None:
        """Record ``pid`` as alive with its start time (a dead pid is a no-op)."""
        checked = check_pid(pid)
        with self._errors_counted():
            self._advise_of_pid(checked)

    def advise_pid_terminated(self, pid: int) -> None:
        """End every non-detached lease and every reader hold of ``pid`` now."""
        checked = check_pid(pid)
        with self._errors_counted():
            self._advise_pid_terminated(checked)

    # -- extensions -------------------------------------------------------

    def lease_with_size(
        self,
        content_id: ContentId,
        lease_id: LeaseId,
        *,
        ttl: float | None = None,
        detached: bool = False,
    ) -> int:
        """As :meth:`lease_by_content`, and return the blob's size in bytes
        (what a lease handle needs, with no second look-up)."""
        if (
            type(content_id) is not ContentId
            or type(lease_id) is not LeaseId
            or ttl is not None
            or detached is not False
        ):
            content_id, lease_id, ttl, detached = _lease_args(content_id, lease_id, ttl, detached)
        try:
            return self._lease_by_content(content_id, lease_id, ttl, detached)
        except BlobLeaseError as exc:
            self._note_error(exc)
            raise

    def take_over_lease(
        self, content_id: ContentId, from_lease_id: LeaseId, to_lease_id: LeaseId
    ) -> int | None:
        """Hold ``to_lease_id`` on ``content_id`` and end ``from_lease_id``
        in one step (how a loaded ticket turns its transfer lease into the
        receiver's lease). If ``from_lease_id`` is not held (already taken
        over, dropped, expired), ``to_lease_id`` is held as
        :meth:`lease_by_content` would hold it. Returns the blob's size, or
        None (nothing held, nothing changed) when the content is absent.
        The new lease has no ttl and depends on its process."""
        cid = _content_id(content_id)
        old, new = _lease_id(from_lease_id, "from_lease_id"), _lease_id(to_lease_id, "to_lease_id")
        if old == new:
            raise ValueError(f"to_lease_id must differ from from_lease_id ({old})")
        try:
            return self._take_over_lease(cid, old, new)
        except BlobLeaseError as exc:
            self._note_error(exc)
            raise

    def store_bytes(
        self,
        data: Any,
        lease_id: LeaseId,
        *,
        algorithm: str = "sha256",
        ttl: float | None = None,
        detached: bool = False,
    ) -> ContentId:
        """Hash ``data`` once, store it and hold ``lease_id``; returns its id."""
        view = as_buffer(data)
        lid = _lease_id(lease_id)
        ttl_s, det = check_ttl(ttl), check_detached(detached)
        alg = check_algorithm(algorithm)
        try:
            cid = self._store_unhashed(view, lid, alg, ttl_s, det)
        except BlobLeaseError as exc:
            self._note_error(exc)
            raise
        self._note("stores")
        return cid

    def store_file(
        self,
        source: FileSource,
        lease_id: LeaseId,
        algorithm: str = "sha256",
        *,
        ttl: float | None = None,
        detached: bool = False,
    ) -> ContentId:
        """Store a file (a path or binary file object) streamed in constant
        memory, hashed while copying; hold ``lease_id`` and return its id."""
        cid, _size = self.store_file_with_size(
            source, lease_id, algorithm, ttl=ttl, detached=detached
        )
        return cid

    def store_file_with_size(
        self,
        source: FileSource,
        lease_id: LeaseId,
        algorithm: str = "sha256",
        *,
        ttl: float | None = None,
        detached: bool = False,
    ) -> tuple[ContentId, int]:
        """As :meth:`store_file`, and return the blob's size in bytes too."""
        args = (
            _file_source(source),
            _lease_id(lease_id),
            check_algorithm(algorithm),
            check_ttl(ttl),
            check_detached(detached),
        )
        try:
            cid, size = self._store_file(*args)
        except BlobLeaseError as exc:
            self._note_error(exc)
            raise
        self._note("stores")
        return cid, size

    def contains(self, content_id: ContentId) -> bool:
        """Whether the content is present (leased, read or retained)."""
        cid = _content_id(content_id)
        with self._errors_counted():
            return self._contains(cid)

    def stat(self, content_id: ContentId) -> BlobInfo:
        """Facts about one blob; ContentNotFound if absent."""
        cid = _content_id(content_id)
        with self._errors_counted():
            return self._stat(cid)

    def iter_content(self) -> Iterator[ContentId]:
        """Every present content id (a snapshot; order unspecified)."""
        with self._errors_counted():
            return iter(self._iter_content())

    def iter_leases(self) -> Iterator[LeaseInfo]:
        """Every held lease (a snapshot; expired leases are not listed)."""
        with self._errors_counted():
            return iter(self._iter_leases())

    def why(self, content_id: ContentId) -> WhyReport:
        """Every holder of one blob: its leases (with when they were taken and
        by which host where the backend records it), its open readers per
        process where the backend knows whose they are, and whether only
        retention keeps it. ContentNotFound if absent. A snapshot: it takes
        no lease and changes nothing."""
        cid = _content_id(content_id)
        with self._errors_counted():
            return self._why(cid)

    def collect(self) -> CollectReport:
        """Reap dead processes' and expired leases, delete unreferenced content
        beyond retention, and report what was freed."""
        with self._errors_counted():
            report = self._collect()
        self._note_collect(report)
        return report

    def verify(self, repair: bool = False) -> VerifyReport:
        """Rehash every blob and report corrupted, missing and orphaned data;
        with ``repair`` remove it (its leases then get LeaseExpired)."""
        if not isinstance(repair, bool):
            raise TypeError(f"repair must be a bool, not {type(repair).__name__}")
        with self._errors_counted():
            return self._verify(repair)

    def stats(self) -> StorageStats:
        """Totals: blobs, bytes, leases, live processes, dedup hits."""
        with self._errors_counted():
            return self._stats()

    def operation_counts(self) -> dict[str, int]:
        """What this handle has done since it was made (a snapshot, for
        :mod:`blobleases.metrics`): ``stores`` (calls of store, store_bytes
        and store_file that succeeded), ``dedup_hits`` (stores that found
        their content present), ``evictions`` and ``evicted_bytes`` (content
        it evicted to make room), ``leases_reaped``, ``readers_reaped``,
        ``processes_reaped``, ``blobs_freed`` and ``bytes_freed`` (by its
        ``collect`` calls), and ``errors:<Kind>``: each BlobLeaseError its
        methods raised, by class name. Counts of no event yet are absent."""
        with _COUNTS_LOCK:
            return dict(self._op_counts or {})

    def _note(self, event: str, n: int = 1) -> None:
        """Count ``n`` of ``event`` done by this handle (see operation_counts);
        backends call it for ``dedup_hits``, ``evictions`` and ``evicted_bytes``."""
        with _COUNTS_LOCK:
            counts = self._op_counts
            if counts is None:
                # An attribute set as usual, never through __dict__: touching
                # an instance's __dict__ makes every attribute read of the
                # handle slower (CPython's inline instance values end).
                counts = self._op_counts = {}
            counts[event] = counts.get(event, 0) + n

    def _note_evictions(self, blobs: int, nbytes: int) -> None:
        """Count blobs this handle evicted (a backend's ``_make_room``)."""
        if blobs:
            self._note("evictions", blobs)
            self._note("evicted_bytes", nbytes)

    def _note_error(self, exc: BlobLeaseError) -> None:
        self._note(f"errors:{type(exc).__name__}")

    @contextmanager
    def _errors_counted(self) -> Iterator[None]:
        """Count a BlobLeaseError raised in the block (:meth:`_note_error`)
        and let it go on. For the methods called now and then: the methods
        of every blob operation (store, lease_by_content, get_data,
        get_reader, advise_lease_dropped, ...) write the same ``try`` inline,
        where it costs nothing until something is raised."""
        try:
            yield
        except BlobLeaseError as exc:
            self._note_error(exc)
            raise

    def _note_collect(self, report: CollectReport) -> None:
        for name in ("leases_reaped", "readers_reaped", "processes_reaped", "bytes_freed"):
            if getattr(report, name):
                self._note(name, getattr(report, name))
        if report.blobs_deleted:
            self._note("blobs_freed", report.blobs_deleted)

    def close(self) -> None:
        """Release this handle's resources. Idempotent. Leases held by this
        process stay in a shared store until dropped or reaped. A shared
        store first ends the expired leases it finds (a bounded number), so
        their content is freed now, not at some process's next operation;
        a handle left open does the same at interpreter exit."""
        self._close()

    def __enter__(self) -> BlobStorage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    # -- what a backend implements --------------------------------------------

    def _store_unhashed(
        self, data: memoryview, lid: LeaseId, algorithm: str, ttl: float | None, detached: bool
    ) -> ContentId:
        """Hash ``data`` with ``algorithm``, then store it as :meth:`_store`
        with ``hashed=True`` does; returns its id. A backend may override
        this to overlap the hashing with its own work, under the same
        guarantees (nothing is visible under the id before it is known)."""
        cid = ContentId.for_bytes(data, algorithm)
        self._store(cid, data, lid, ttl, detached, True)
        return cid

    @staticmethod
    def _lease_expired(cid: ContentId, lid: LeaseId) -> LeaseExpired:
        """The error for a read through a lease that is not held."""
        return LeaseExpired(f"lease {lid} on {cid} is not held", lease_id=lid, content_id=cid)

    @abc.abstractmethod
    def _store(
        self,
        cid: ContentId,
        data: memoryview,
        lid: LeaseId,
        ttl: float | None,
        detached: bool,
        hashed: bool,
    ) -> None:
        """Guarantee: if ``(lid, cid)`` is held, do nothing. If ``cid`` is
        present, count a dedup hit and hold the lease. Otherwise, unless
        ``hashed`` (the caller just hashed ``data`` itself), check that
        ``data`` hashes to ``cid`` (IntegrityError, nothing stored); make room
        under ``max_bytes`` per ``on_full`` (StoreFull leaves everything as it
        was); make the bytes durable per ``durability``; then hold the lease.
        Content and lease appear together or not at all."""

    @abc.abstractmethod
    def _store_file(
        self, source: FileSource, lid: LeaseId, algorithm: str, ttl: float | None, detached: bool
    ) -> tuple[ContentId, int]:
        """Guarantee: as ``_store``, reading ``source`` once in bounded memory
        and hashing while copying; returns the id and the size in bytes. A
        path is opened by the backend; a file object is read from its current
        position to its end and not closed."""

    @abc.abstractmethod
    def _lease_by_content(
        self, cid: ContentId, lid: LeaseId, ttl: float | None, detached: bool
    ) -> int:
        """Guarantee: atomically check presence and hold the lease (a no-op if
        held); a retained blob becomes referenced again; absent content raises
        ContentNotFound. Returns the blob's size in bytes."""

    def _take_over_lease(self, cid: ContentId, old: LeaseId, new: LeaseId) -> int | None:
        """Guarantee: afterwards ``(new, cid)`` is held (no ttl, not
        detached) and ``(old, cid)`` is not, and the content was never
        unreferenced in between; None, having held nothing, if the content
        is absent (content whose only leases expired counts as absent). A
        backend makes the two changes one atomic step (one lock, transaction
        or script): no other thread or process sees one without the other,
        and a crash leaves both or neither. This default, for backends without one, holds ``new`` first
        and then drops ``old``: the content is never freed in between, but a
        crash between the two leaves ``old`` until it expires."""
        try:
            size = self._lease_by_content(cid, new, None, False)
        except ContentNotFound:
            return None
        self._advise_lease_dropped(old, cid)
        return size

    @abc.abstractmethod
    def _get_data(self, cid: ContentId, lid: LeaseId) -> bytes:
        """Guarantee: LeaseExpired unless ``(lid, cid)`` is held and unexpired;
        never partial bytes (IntegrityError on a wrong size), never bytes that
        fail the hash when ``verify_reads``. Records access for LRU."""

    @abc.abstractmethod
    def _get_reader(self, cid: ContentId, lid: LeaseId) -> BlobReader:
        """Guarantee: as ``_get_data``; the reader is a hold of this process
        on the content that outlives the lease until the reader is closed."""

    @abc.abstractmethod
    def _advise_lease_dropped(self, lid: LeaseId, cid: ContentId) -> None:
        """Guarantee: ends exactly this lease; a no-op if it is not held;
        content left with no lease and no reader is deleted or retained."""

    @abc.abstractmethod
    def _advise_of_pid(self, pid: int) -> None:
        """Guarantee: a live pid is recorded with its start time, so leases of
        an earlier process with the same pid are reaped; a dead pid is a no-op."""

    @abc.abstractmethod
    def _advise_pid_terminated(self, pid: int) -> None:
        """Guarantee: every non-detached lease whose ``lease_id.pid`` is
        ``pid`` and every reader hold of ``pid`` ends now; unknown pid no-op."""

    @abc.abstractmethod
    def _contains(self, cid: ContentId) -> bool:
        """Guarantee: True exactly when the content is present."""

    @abc.abstractmethod
    def _stat(self, cid: ContentId) -> BlobInfo:
        """Guarantee: current facts, or ContentNotFound."""

    @abc.abstractmethod
    def _iter_content(self) -> list[ContentId]:
        """Guarantee: a snapshot of present content ids."""

    @abc.abstractmethod
    def _iter_leases(self) -> list[LeaseInfo]:
        """Guarantee: a snapshot of held, unexpired leases."""

    def _why(self, cid: ContentId) -> WhyReport:
        """Guarantee: the blob's facts, its held unexpired leases and its
        reader holds, or ContentNotFound. This default builds it from
        ``_stat`` and ``_iter_leases`` (readers as one entry of unknown
        pid); a backend that knows more (lease times, hosts, readers per
        process) overrides it."""
        info = self._stat(cid)
        held = tuple(sorted((i for i in self._iter_leases() if i.content_id == cid), key=_by_age))
        readers = (ReaderInfo(None, info.reader_count),) if info.reader_count else ()
        return WhyReport(info, held, readers, retained=not held and not info.reader_count)

    @abc.abstractmethod
    def _collect(self) -> CollectReport:
        """Guarantee: reaps leases and holds of dead processes and expired
        leases, deletes unreferenced content beyond retention, removes
        leftovers of crashed writers; never touches held content."""

    @abc.abstractmethod
    def _verify(self, repair: bool) -> VerifyReport:
        """Guarantee: rehashes every blob; reports corrupted, missing and
        orphaned data; with ``repair`` removes it and the leases on it."""

    @abc.abstractmethod
    def _stats(self) -> StorageStats:
        """Guarantee: current totals."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Guarantee: idempotent; afterwards operations raise StorageError."""


def _by_age(info: LeaseInfo) -> tuple[float, str]:
    """Oldest lease first (leases of unknown age last), then by lease id."""
    return (info.created_at if info.created_at is not None else float("inf"), str(info.lease_id))


def check_hash(cid: ContentId, data: Any) -> None:
    """IntegrityError unless ``data`` hashes to ``cid``."""
    if not cid.matches(data):
        raise IntegrityError(f"data does not hash to {cid}")
