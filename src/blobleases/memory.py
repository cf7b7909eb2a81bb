"""MemoryStorage: blobs in this process's memory, safe from many threads.

The reference backend, and an adapter only: its data structures and the
verbs of :class:`blobleases.engine.Adapter` over them; every rule of SPEC
sections 2 and 3 is :class:`blobleases.engine.Engine`'s, run under one lock
(the transaction). Readers are zero-copy memoryviews.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import forksafe, ingest
from .content_id import ContentId, new_hasher
from .engine import Engine
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
from .storage import BlobStorage, FileSource, check_hash

__all__ = ["MemoryStorage"]


#: Accesses within this many seconds share one last-access time (one float
#: object), so recording an access frees no float stored long ago.
_STAMP_RESOLUTION = 0.001


@dataclass(slots=True)
class _Lease:
    expires_at: float | None
    detached: bool


#: Shared by every lease without a ttl (leases are never mutated), so the
#: common acquire allocates no record.
_PLAIN = _Lease(None, False)
_DETACHED = _Lease(None, True)


class _Blob(dict[LeaseId, _Lease]):
    """One blob, and (as the dict itself) the leases held on it.

    The leases live in the blob's own record, not in a table of every lease:
    at a million blobs an acquire or drop then touches the blob's memory
    only, instead of also probing a second million-entry table.
    """

    __slots__ = ("created", "data", "last_access", "readers", "size")

    def __init__(self, data: bytes, size: int, created: float) -> None:
        super().__init__()
        self.data = data
        self.size = size
        self.created = self.last_access = created
        self.readers = 0


def _fork_lock(storage: MemoryStorage) -> threading.RLock:
    return storage._lock


class MemoryStorage(BlobStorage):
    """Blobs held in this process (threads share it; other processes do not).

    Takes every policy keyword of :class:`~blobleases.policies.Policies`;
    ``durability`` has no effect (nothing outlives the process).
    """

    shareable = False

    def __init__(self, **policies: Any) -> None:
        super().__init__(**policies)
        self._lock = threading.RLock()
        self._engine: Engine[ContentId] = Engine(self.policies, time.monotonic())
        self._reaps = self._engine.reaps
        self._blobs: dict[ContentId, _Blob] = {}
        # Non-detached leases by pid, for reaping. This process's own leases
        # are not indexed (it never reaps itself; terminating it scans).
        self._by_pid: dict[int, set[tuple[ContentId, LeaseId]]] = {}
        self._own_pid = os.getpid()
        self._readers: dict[int, tuple[ContentId, int]] = {}
        self._reader_ids = itertools.count(1)
        self._order: OrderedDict[ContentId, None] = OrderedDict()  # LRU: oldest first
        self._retained: OrderedDict[ContentId, None] = OrderedDict()
        self._retained_total = 0
        self._expiries: list[tuple[float, str, LeaseId, ContentId]] = []
        self._pids: dict[int, float | None] = {os.getpid(): own_start_time()}
        self._bytes = 0
        self._dedup_hits = 0
        self._evictions = self._evicted_bytes = 0
        self._closed = False
        self._stamp = time.time()  # the last-access time recorded now
        # Access order only decides evictions, which need a max_bytes.
        self._track_order = self.policies.max_bytes is not None
        forksafe.register(self, lock=_fork_lock, child=MemoryStorage._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.RLock()
        parent, self._own_pid = self._own_pid, os.getpid()
        inherited = set(self._scan(parent))
        if inherited:
            self._by_pid[parent] = inherited

    @property
    def url(self) -> str:
        return "memory://"

    # -- the adapter verbs (blobleases.engine.Adapter; called with the lock held) --

    def add_content(self, key: ContentId, size: int, payload: Any) -> None:
        self._stamp = now = time.time()
        self._blobs[key] = _Blob(payload, size, now)
        if self._track_order:
            self._order[key] = None
        self._bytes += size

    def add_lease(
        self, key: ContentId, lid: LeaseId, expires_at: float | None, detached: bool
    ) -> int | None:
        # A hot path (every acquire): lookups are kept few and inlined.
        blob = self._blobs.get(key)
        if blob is None:
            return None
        if expires_at is None:
            held = len(blob)
            blob.setdefault(lid, _DETACHED if detached else _PLAIN)  # one hash of lid
            if len(blob) == held:
                return blob.size
        else:
            if lid in blob:
                return blob.size
            blob[lid] = _Lease(expires_at, detached)
            heapq.heappush(self._expiries, (expires_at, str(lid), lid, key))
        if not detached and lid.pid != self._own_pid:
            pid = lid.pid
            if pid not in self._pids:
                self._pids[pid] = process_start_time(pid)
            keys = self._by_pid.get(pid)
            if keys is None:
                keys = self._by_pid[pid] = set()
            keys.add((key, lid))
        if self._retained and key in self._retained:
            del self._retained[key]
            self._retained_total -= blob.size
        now = time.time()  # (the access, as _touch records it: inlined)
        if not 0.0 <= now - self._stamp < _STAMP_RESOLUTION:
            self._stamp = now
        blob.last_access = self._stamp
        if self._track_order:
            self._order.move_to_end(key)
        return blob.size

    def has_lease(self, key: ContentId, lid: LeaseId) -> bool:
        blob = self._blobs.get(key)
        return blob is not None and lid in blob

    def remove_lease(self, key: ContentId, lid: LeaseId) -> bool:
        # A hot path (every drop).
        blob = self._blobs.get(key)
        if blob is None:
            return False
        lease = blob.pop(lid, None)
        if lease is None:
            return False
        if not lease.detached and lid.pid != self._own_pid:
            self._unindex(key, lid)
        return not blob and not blob.readers

    def remove_hold(self, hold: int) -> ContentId | None:
        key = self._readers.pop(hold, (None, 0))[0]
        blob = None if key is None else self._blobs.get(key)
        if blob is None:
            return None
        blob.readers -= 1
        return None if blob or blob.readers else key

    def leases_of(self, pid: int) -> list[tuple[ContentId, LeaseId]]:
        if pid == self._own_pid:  # this process's leases are not indexed
            return list(self._scan(pid))
        return list(self._by_pid.get(pid, ()))

    def holds_of(self, pid: int) -> list[int]:
        return [hold for hold, (_, owner) in self._readers.items() if owner == pid]

    def expired_leases(self, now: float) -> list[tuple[ContentId, LeaseId]]:
        expired = []
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, _, lid, key = heapq.heappop(self._expiries)
            blob = self._blobs.get(key)
            lease = None if blob is None else blob.get(lid)
            if lease is not None and lease.expires_at == expires_at:
                expired.append((key, lid))
        return expired

    def owner_pids(self) -> set[int]:
        pids = set(self._by_pid) | {pid for _, pid in self._readers.values()}
        pids.discard(self._own_pid)  # alive: it is running this
        return pids

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

    def unreferenced_size(self, key: ContentId) -> int | None:
        blob = self._blobs.get(key)
        if blob is None or blob or blob.readers or key in self._retained:
            return None
        return blob.size

    def delete_if_unreferenced(self, key: ContentId) -> None:
        if self.unreferenced_size(key) is not None:
            self.delete_content(key)

    def delete_content(self, key: ContentId) -> int:
        blob = self._blobs.pop(key, None)
        if blob is None:
            return 0
        self._order.pop(key, None)
        if key in self._retained:
            del self._retained[key]
            self._retained_total -= blob.size
        for lid, lease in blob.items():
            if not lease.detached and lid.pid != self._own_pid:
                self._unindex(key, lid)
        self._bytes -= blob.size
        return blob.size

    def retain(self, key: ContentId) -> None:
        self._retained[key] = None
        self._retained_total += self._blobs[key].size

    def retained_bytes(self) -> int:
        return self._retained_total

    def retained_oldest_first(self) -> Iterator[tuple[ContentId, int]]:
        return ((key, self._blobs[key].size) for key in self._retained)

    def evictable_oldest_first(self) -> Iterator[tuple[ContentId, int, bool]]:
        retained, blobs = self._retained, self._blobs
        return (
            (key, blobs[key].size, bool(blobs[key].readers))
            for key in self._order
            if key not in retained
        )

    def total_bytes(self) -> int:
        return self._bytes

    # -- internal helpers (call with the lock held) -------------------------------

    def _scan(self, pid: int) -> Iterator[tuple[ContentId, LeaseId]]:
        """Every non-detached lease of ``pid``, by scanning (``pid`` is not indexed)."""
        for key, blob in self._blobs.items():
            for lid, lease in blob.items():
                if lid.pid == pid and not lease.detached:
                    yield key, lid

    def _touch(self, key: ContentId, blob: _Blob) -> None:
        now = time.time()
        if not 0.0 <= now - self._stamp < _STAMP_RESOLUTION:  # (the clock may step back)
            self._stamp = now
        blob.last_access = self._stamp
        if self._track_order:
            self._order.move_to_end(key)

    def _unindex(self, key: ContentId, lid: LeaseId) -> None:
        """Remove another process's lease from the index by pid."""
        keys = self._by_pid.get(lid.pid)
        if keys is not None:
            keys.discard((key, lid))
            if not keys:
                del self._by_pid[lid.pid]

    def _maintain(self) -> None:
        """Start an operation: expired leases end, a due reap runs."""
        if self._closed:
            raise StorageError("the storage is closed")
        if self._expiries and self._expiries[0][0] <= time.time():
            self._engine.expire(self, time.time())
        now = time.monotonic()
        if self._reaps.due(now):
            self._engine.reap(self, now)

    def _leased_blob(self, cid: ContentId, lid: LeaseId) -> _Blob:
        self._maintain()
        blob = self._blobs.get(cid)
        if blob is None or lid not in blob:
            raise self._lease_expired(cid, lid)
        self._touch(cid, blob)
        self._engine.check_read(cid, blob.data, blob.size, len(blob.data))
        return blob

    # -- the backend methods -----------------------------------------------------

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
        copy = owner if type(owner) is bytes and len(owner) == data.nbytes else bytes(data)
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
            return self._leased_blob(cid, lid).data

    def _get_reader(self, cid: ContentId, lid: LeaseId) -> BlobReader:
        with self._lock:
            blob = self._leased_blob(cid, lid)
            hold = next(self._reader_ids)
            self._readers[hold] = (cid, os.getpid())
            blob.readers += 1
            data = blob.data

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
            return cid in self._blobs

    def _stat(self, cid: ContentId) -> BlobInfo:
        with self._lock:
            self._maintain()
            blob = self._blobs.get(cid)
            if blob is None:
                raise ContentNotFound(cid)
            return BlobInfo(cid, blob.size, len(blob), blob.readers, blob.created, blob.last_access)

    def _iter_content(self) -> list[ContentId]:
        with self._lock:
            self._maintain()
            return list(self._blobs)

    def _iter_leases(self) -> list[LeaseInfo]:
        with self._lock:
            self._maintain()
            return [
                LeaseInfo(lid, cid, lid.pid, lease.expires_at, lease.detached)
                for cid, blob in self._blobs.items()
                for lid, lease in blob.items()
            ]

    def _why(self, cid: ContentId) -> WhyReport:
        """Readers per process from the hold table; lease times are not
        recorded here (leases without a ttl share one record)."""
        with self._lock:
            self._maintain()
            blob = self._blobs.get(cid)
            if blob is None:
                raise ContentNotFound(cid)
            info = BlobInfo(cid, blob.size, len(blob), blob.readers, blob.created, blob.last_access)
            leases = [
                LeaseInfo(lid, cid, lid.pid, lease.expires_at, lease.detached)
                for lid, lease in blob.items()
            ]
            per_pid = Counter(pid for hcid, pid in self._readers.values() if hcid == cid)
            retained = cid in self._retained
        leases.sort(key=lambda i: str(i.lease_id))
        readers = tuple(ReaderInfo(pid, n) for pid, n in sorted(per_pid.items()))
        return WhyReport(info, tuple(leases), readers, retained)

    def _collect(self) -> CollectReport:
        with self._lock:
            if self._closed:
                raise StorageError("the storage is closed")
            before_blobs, before_bytes = len(self._blobs), self._bytes
            expired = self._engine.expire(self, time.time())
            leases, readers, procs = self._engine.reap(self, time.monotonic())
            self._engine.trim_retained(self, self.policies.retain_bytes)
            return CollectReport(
                leases_reaped=leases + expired,
                readers_reaped=readers,
                processes_reaped=procs,
                blobs_deleted=before_blobs - len(self._blobs),
                bytes_freed=before_bytes - self._bytes,
            )

    def _verify(self, repair: bool) -> VerifyReport:
        with self._lock:
            self._maintain()
            items = list(self._blobs.items())
        report = VerifyReport(checked=len(items))
        for cid, blob in items:
            if len(blob.data) != blob.size or not cid.matches(blob.data):
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
            owners = {lid.pid for blob in self._blobs.values() for lid in blob}
            owners.update(p for _, p in self._readers.values())
            return StorageStats(
                blobs=len(self._blobs),
                bytes=self._bytes,
                leases=sum(map(len, self._blobs.values())),
                processes=sum(1 for pid in owners if self.is_alive(pid)),
                dedup_hits=self._dedup_hits,
                readers=len(self._readers),
                retained_blobs=len(self._retained),
                retained_bytes=self._retained_total,
                evictions=self._evictions,
                evicted_bytes=self._evicted_bytes,
            )

    def _close(self) -> None:
        with self._lock:
            self._closed = True

    # -- test support ------------------------------------------------------------

    def _corrupt_for_tests(self, cid: ContentId, data: bytes) -> None:
        """Replace a blob's bytes in place (the conformance suite's fault hook)."""
        with self._lock:
            self._blobs[cid].data = data
