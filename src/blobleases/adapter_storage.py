"""AdapterStorage: a whole backend from the engine's adapter verbs, under one lock.

A store whose data lives in this process subclasses :class:`AdapterStorage`
and writes only how it keeps things (:class:`~blobleases.memory.MemoryStorage`
is the example):

- the content, lease and retention verbs of :class:`blobleases.engine.Adapter`:
  ``add_content``, ``add_lease``, ``has_lease``, ``remove_lease``,
  ``owner_leases``, ``expired_batch``, ``owner_pids``, ``unreferenced_size``,
  ``delete_content``, ``retain``, ``retained_bytes``,
  ``retained_oldest_first``, ``evictable_oldest_first``, ``total_bytes``
  (a ttl lease is pushed on ``self._expiries``, an
  :class:`~blobleases.engine.ExpiryQueue`);
- the reading verbs declared here, each with its guarantee:
  :meth:`leased_payload`, :meth:`add_reader`, :meth:`remove_reader`,
  :meth:`has_content`, :meth:`blob_info`, :meth:`lease_infos`,
  :meth:`stored_payloads`, :meth:`counts`, :meth:`lease_pids`.

Everything else is written here once: every abstract member of
:class:`~blobleases.storage.BlobStorage` as one transaction (the lock)
around :class:`~blobleases.engine.Engine` calls; ttl expiry and the reap
schedule at the start of an operation; the process table (start times,
liveness), the reader-hold table (whose readers), the dedup and eviction
counts (the remaining Adapter verbs); stats, why, verify and collect; and
fork safety (:mod:`blobleases.forksafe`: the child gets a fresh lock and
its own pid, and the parent's leases become another process's).

Payloads are bytes of this process: a store keeps the ``bytes`` object it is
given (anything else is copied once) and readers are zero-copy memoryviews.
"""

from __future__ import annotations

import abc
import itertools
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from . import forksafe, gil_free, ingest
from .content_id import ContentId, new_hasher
from .engine import Engine, ExpiryQueue
from .errors import ContentNotFound, StorageError
from .lease_id import LeaseId
from .liveness import is_alive, own_start_time, process_start_time
from .reader import BlobReader, BufferSource
from .reports import (
    BlobInfo,
    CollectReport,
    LeaseInfo,
    ReaderInfo,
    StorageStats,
    VerifyReport,
    WhyReport,
)
from .storage import BlobStorage, FileSource, _by_age, check_hash

__all__ = ["AdapterStorage"]

K = ContentId  # an AdapterStorage keys its content by content id


def _lock_of(storage: AdapterStorage) -> threading.RLock:
    return storage._lock


def _child(storage: AdapterStorage) -> None:
    storage._after_fork()


class AdapterStorage(BlobStorage):
    """A backend of this process that is only an adapter (see the module
    docstring). Every verb is called with ``self._lock`` held."""

    def __init__(self, **policies: Any) -> None:
        super().__init__(**policies)
        self._lock = threading.RLock()
        self._engine: Engine[K] = Engine(self.policies, time.monotonic())
        self._reaps = self._engine.reaps
        self._expiries: ExpiryQueue[K] = ExpiryQueue()
        self._own_pid = os.getpid()
        self._pids: dict[int, float | None] = {self._own_pid: own_start_time()}
        self._holds: dict[int, tuple[K, int]] = {}  # reader hold -> (content, pid)
        self._hold_ids = itertools.count(1)
        self._dedup_hits = self._evictions = self._evicted_bytes = 0
        self._closed = False
        forksafe.register(self, lock=_lock_of, child=_child)

    def _after_fork(self) -> None:
        """In a forked child (see :mod:`blobleases.forksafe`): a fresh lock,
        and this process's pid; a subclass that indexes leases by pid
        extends it to index the parent's."""
        self._lock = threading.RLock()
        self._own_pid = os.getpid()

    # -- what a subclass implements (besides the Adapter verbs it keeps) -------

    @abc.abstractmethod
    def leased_payload(self, key: K, lid: LeaseId) -> tuple[Any, int] | None:
        """The payload and recorded size of ``key`` if ``(lid, key)`` is held
        (recording an access, for the LRU); None if it is not."""

    @abc.abstractmethod
    def add_reader(self, key: K) -> None:
        """One more reader hold on present content ``key`` (this class
        records whose)."""

    @abc.abstractmethod
    def remove_reader(self, key: K) -> bool:
        """One reader hold on ``key`` ends: True if that left it unreferenced
        (present, no lease, no reader); False if absent."""

    @abc.abstractmethod
    def has_content(self, key: K) -> bool:
        """Whether ``key`` is present."""

    @abc.abstractmethod
    def blob_info(self, key: K) -> BlobInfo | None:
        """The facts of present content ``key``; None if absent."""

    @abc.abstractmethod
    def lease_infos(self, key: K | None, host: str | None = None) -> list[LeaseInfo]:
        """Every held lease on ``key`` (on any content when None), with when
        it was taken and ``host`` as its host."""

    @abc.abstractmethod
    def stored_payloads(self) -> list[tuple[K, Any, int]]:
        """(key, payload, recorded size) of all present content: a snapshot."""

    @abc.abstractmethod
    def counts(self) -> tuple[int, int, int]:
        """(present contents, held leases, retained contents)."""

    @abc.abstractmethod
    def lease_pids(self) -> set[int]:
        """The pid of every held lease, detached ones included."""

    # the Adapter verbs of blobleases.engine a subclass implements
    @abc.abstractmethod
    def add_content(self, key: K, size: int, payload: Any) -> None: ...
    @abc.abstractmethod
    def add_lease(
        self, key: K, lid: LeaseId, expires_at: float | None, detached: bool
    ) -> int | None: ...
    @abc.abstractmethod
    def has_lease(self, key: K, lid: LeaseId) -> bool: ...
    @abc.abstractmethod
    def remove_lease(self, key: K, lid: LeaseId) -> bool: ...
    @abc.abstractmethod
    def owner_leases(self, owner: int, limit: int) -> list[tuple[K, LeaseId]]: ...
    @abc.abstractmethod
    def expired_batch(self, now: float, limit: int) -> list[tuple[K, LeaseId]]: ...
    @abc.abstractmethod
    def owner_pids(self) -> set[int]: ...
    @abc.abstractmethod
    def unreferenced_size(self, key: K) -> int | None: ...
    @abc.abstractmethod
    def delete_content(self, key: K) -> int: ...
    @abc.abstractmethod
    def retain(self, key: K) -> None: ...
    @abc.abstractmethod
    def retained_bytes(self) -> int: ...
    @abc.abstractmethod
    def retained_oldest_first(self) -> Iterable[tuple[K, int]]: ...
    @abc.abstractmethod
    def evictable_oldest_first(self) -> Iterable[tuple[K, int, bool]]: ...
    @abc.abstractmethod
    def total_bytes(self) -> int: ...

    # -- the Adapter verbs written here ---------------------------------------------

    def remove_hold(self, hold: int) -> K | None:
        key = self._holds.pop(hold, (None, 0))[0]
        return key if key is not None and self.remove_reader(key) else None

    def remove_leases(self, batch: list[tuple[K, LeaseId]]) -> list[K]:
        return [key for key, lid in batch if self.remove_lease(key, lid)]

    def owner_holds(self, owner: int, limit: int) -> list[int]:
        holds = (hold for hold, (_, pid) in self._holds.items() if pid == owner)
        return list(itertools.islice(holds, limit))

    def remove_holds(self, holds: list[int]) -> list[K]:
        return [key for key in map(self.remove_hold, holds) if key is not None]

    def is_alive(self, pid: int) -> bool:
        return is_alive(pid, self._pids.get(pid))

    def recorded_start(self, pid: int) -> float | None:
        return self._pids.get(pid)

    def record_pid(self, pid: int, start: float | None) -> None:
        if start is None:
            self._pids.pop(pid, None)
        else:
            self._pids[pid] = start

    def count_dedup(self) -> None:
        self._dedup_hits += 1
        self._note("dedup_hits")

    def count_evictions(self, blobs: int, freed: int) -> None:
        self._evictions += blobs
        self._evicted_bytes += freed
        self._note_evictions(blobs, freed)

    def delete_if_unreferenced(self, key: K) -> None:
        if self.unreferenced_size(key) is not None:
            self.delete_content(key)

    def _record_pid_of(self, pid: int) -> None:
        """Record another process's start time at its first lease (so a
        reused pid is dead); a subclass's ``add_lease`` calls it."""
        if pid not in self._pids:
            self._pids[pid] = process_start_time(pid)

    # -- one operation = one transaction ---------------------------------------------

    def _maintain(self) -> None:
        """Start an operation: expired leases end, a due reap runs."""
        if self._closed:
            raise StorageError("the storage is closed")
        if self._expiries and self._expiries[0][0] <= time.time():
            self._engine.expire_all(self, time.time())
        now = time.monotonic()
        if self._reaps.due(now):
            self._engine.reap(self, now)

    def _leased(self, cid: K, lid: LeaseId) -> Any:
        self._maintain()
        held = self.leased_payload(cid, lid)
        if held is None:
            raise self._lease_expired(cid, lid)
        data, size = held
        self._engine.check_read(cid, data, size, len(data))
        return data

    def _store(
        self,
        cid: ContentId,
        data: memoryview,
        lid: LeaseId,
        ttl: float | None,
        detached: bool,
        hashed: bool,
    ) -> None:
        with self._lock:
            self._maintain()
            if self._engine.store_hit(self, cid, lid, ttl, detached):
                return
        if not hashed:
            check_hash(cid, data)
        owner = data.obj
        # bytes are immutable: a whole bytes object is kept as it is, not copied
        copy = owner if type(owner) is bytes and len(owner) == data.nbytes else gil_free.to_bytes(data)
        with self._lock:
            self._maintain()
            if not self._engine.store_hit(self, cid, lid, ttl, detached):
                self._engine.store_new(self, cid, len(copy), copy, lid, ttl, detached)

    def _store_file(
        self, source: FileSource, lid: LeaseId, algorithm: str, ttl: float | None, detached: bool
    ) -> tuple[ContentId, int]:
        hasher = new_hasher(algorithm)
        parts: list[bytes] = []
        with ingest.open_source(source, ingest.cannot_read) as f:
            ingest.copy(f, hasher, lambda chunk: parts.append(bytes(chunk)))
        data = b"".join(parts)
        cid = ContentId(algorithm, hasher.digest())
        self._store(cid, memoryview(data), lid, ttl, detached, True)
        return cid, len(data)

    def _lease_by_content(
        self, cid: ContentId, lid: LeaseId, ttl: float | None, detached: bool
    ) -> int:
        with self._lock:
            if self._closed or self._expiries or time.monotonic() >= self._reaps.next:
                self._maintain()
            size = self._engine.hold(self, cid, lid, ttl, detached)
            if size is None:
                raise ContentNotFound(cid)
            return size

    def _take_over_lease(self, cid: ContentId, old: LeaseId, new: LeaseId) -> int | None:
        with self._lock:
            self._maintain()
            return self._engine.take_over(self, cid, old, new)

    def _get_data(self, cid: ContentId, lid: LeaseId) -> bytes:
        with self._lock:
            data: bytes = self._leased(cid, lid)
            return data

    def _get_reader(self, cid: ContentId, lid: LeaseId) -> BlobReader:
        with self._lock:
            data = self._leased(cid, lid)
            hold = next(self._hold_ids)
            self._holds[hold] = (cid, os.getpid())
            self.add_reader(cid)

        def release() -> None:
            with self._lock:
                if not self._closed:
                    self._engine.end_hold(self, hold)

        return BlobReader(BufferSource(memoryview(data)), len(data), release)

    def _advise_lease_dropped(self, lid: LeaseId, cid: ContentId) -> None:
        with self._lock:
            if self._closed or self._expiries or time.monotonic() >= self._reaps.next:
                self._maintain()
            self._engine.end_lease(self, cid, lid)

    def _advise_of_pid(self, pid: int) -> None:
        with self._lock:
            self._maintain()
            self._engine.advise_of_pid(self, pid, process_start_time(pid))

    def _advise_pid_terminated(self, pid: int) -> None:
        with self._lock:
            self._maintain()
            self._engine.advise_pid_terminated(self, pid)

    def _contains(self, cid: ContentId) -> bool:
        with self._lock:
            self._maintain()
            return self.has_content(cid)

    def _stat(self, cid: ContentId) -> BlobInfo:
        with self._lock:
            self._maintain()
            info = self.blob_info(cid)
        if info is None:
            raise ContentNotFound(cid)
        return info

    def _iter_content(self) -> list[ContentId]:
        with self._lock:
            self._maintain()
            return [key for key, _, _ in self.stored_payloads()]

    def _iter_leases(self) -> list[LeaseInfo]:
        with self._lock:
            self._maintain()
            return self.lease_infos(None)

    def _why(self, cid: ContentId) -> WhyReport:
        """Every lease with when it was taken; readers per process from the
        hold table; every holder is of this host (one process)."""
        host = socket.gethostname() or "localhost"
        with self._lock:
            self._maintain()
            info = self.blob_info(cid)
            if info is None:
                raise ContentNotFound(cid)
            leases = sorted(self.lease_infos(cid, host), key=_by_age)
            per_pid = Counter(pid for key, pid in self._holds.values() if key == cid)
        readers = tuple(ReaderInfo(pid, n, host) for pid, n in sorted(per_pid.items()))
        return WhyReport(info, tuple(leases), readers, not leases and not info.reader_count)

    def _collect(self) -> CollectReport:
        with self._lock:
            if self._closed:
                raise StorageError("the storage is closed")
            before_blobs, before_bytes = self.counts()[0], self.total_bytes()
            expired = self._engine.expire_all(self, time.time())
            leases, readers, procs = self._engine.reap(self, time.monotonic())
            self._engine.trim_retained(self, self.policies.retain_bytes)
            return CollectReport(
                leases_reaped=leases + expired,
                readers_reaped=readers,
                processes_reaped=procs,
                blobs_deleted=before_blobs - self.counts()[0],
                bytes_freed=before_bytes - self.total_bytes(),
            )

    def _verify(self, repair: bool) -> VerifyReport:
        with self._lock:
            self._maintain()
            items = self.stored_payloads()
        report = VerifyReport(checked=len(items))
        for cid, data, size in items:
            if len(data) != size or not cid.matches(data):
                report.corrupted.append(cid)
        if repair and report:
            with self._lock:
                for cid in report.corrupted:
                    self.delete_content(cid)
            report.repaired = True
        return report

    def _stats(self) -> StorageStats:
        with self._lock:
            self._maintain()
            blobs, leases, retained = self.counts()
            owners = self.lease_pids() | {pid for _, pid in self._holds.values()}
            return StorageStats(
                blobs=blobs,
                bytes=self.total_bytes(),
                leases=leases,
                processes=sum(1 for pid in owners if self.is_alive(pid)),
                dedup_hits=self._dedup_hits,
                readers=len(self._holds),
                retained_blobs=retained,
                retained_bytes=self.retained_bytes(),
                evictions=self._evictions,
                evicted_bytes=self._evicted_bytes,
            )

    def _close(self) -> None:
        with self._lock:
            self._closed = True
