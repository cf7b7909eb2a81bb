"""MemoryStorage: blobs in this process's memory, safe from many threads.

The reference backend: the simplest code that meets every guarantee of
:class:`~blobleases.storage.BlobStorage`. Readers are zero-copy memoryviews.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from . import forksafe, ingest, policy_rules
from .content_id import ContentId, new_hasher
from .errors import ContentNotFound, IntegrityError, StorageError, StoreFull
from .lease_id import LeaseId
from .liveness import is_alive, own_start_time, process_start_time, same_start
from .reader import BlobReader, BufferSource
from .reports import BlobInfo, CollectReport, LeaseInfo, StorageStats, VerifyReport
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
    only, instead of also probing a second million-entry table (more cache
    and TLB misses per pair at scale; the lookup in ``_blobs`` remains).
    """

    __slots__ = ("created", "data", "last_access", "readers", "size")

    def __init__(self, data: bytes, size: int, created: float, last_access: float) -> None:
        super().__init__()
        self.data = data
        self.size = size
        self.created = created
        self.last_access = last_access
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
        self._blobs: dict[ContentId, _Blob] = {}
        # Non-detached leases by pid, for reaping. This process's own leases
        # are not indexed (it never reaps itself; terminating it scans).
        self._by_pid: dict[int, set[tuple[LeaseId, ContentId]]] = {}
        self._own_pid = os.getpid()
        self._readers: dict[int, tuple[ContentId, int]] = {}
        self._reader_ids = itertools.count(1)
        self._order: OrderedDict[ContentId, None] = OrderedDict()  # LRU: oldest first
        self._retained: OrderedDict[ContentId, None] = OrderedDict()
        self._retained_bytes = 0
        self._expiries: list[tuple[float, str, LeaseId, ContentId]] = []
        self._pids: dict[int, float | None] = {os.getpid(): own_start_time()}
        self._bytes = 0
        self._dedup_hits = 0
        self._closed = False
        self._next_reap = time.monotonic() + self.policies.reap_interval
        self._stamp = time.time()  # the last-access time recorded now
        # Access order only decides evictions, which need a max_bytes.
        self._track_order = self.policies.max_bytes is not None
        forksafe.register(self, lock=_fork_lock, child=MemoryStorage._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.RLock()
        parent, self._own_pid = self._own_pid, os.getpid()
        inherited = self._own_leases(parent)
        if inherited:
            self._by_pid[parent] = inherited

    @property
    def url(self) -> str:
        return "memory://"

    # -- internal helpers (call with the lock held) ---------------------------

    def _own_leases(self, pid: int) -> set[tuple[LeaseId, ContentId]]:
        """Every non-detached lease of ``pid``, by scanning (``pid`` is not indexed)."""
        return {
            (lid, cid)
            for cid, blob in self._blobs.items()
            for lid, lease in blob.items()
            if lid.pid == pid and not lease.detached
        }

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("the storage is closed")

    def _maintain(self) -> None:
        self._check_open()
        if self._expiries and self._expiries[0][0] <= time.time():
            self._expire()
        if time.monotonic() >= self._next_reap:
            self._reap_dead()

    def _expire(self) -> int:
        now = time.time()
        ended = 0
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, _, lid, cid = heapq.heappop(self._expiries)
            blob = self._blobs.get(cid)
            lease = None if blob is None else blob.get(lid)
            if lease is not None and lease.expires_at == expires_at:
                self._end_lease(lid, cid)
                ended += 1
        return ended

    def _reap_dead(self) -> tuple[int, int, int]:
        self._next_reap = time.monotonic() + self.policies.reap_interval
        pids = set(self._by_pid) | {pid for _, pid in self._readers.values()}
        pids.discard(self._own_pid)  # alive: it is running this
        leases = readers = procs = 0
        for pid in pids:
            if is_alive(pid, self._pids.get(pid)):
                continue
            nl, nr = self._terminate(pid)
            leases += nl
            readers += nr
            procs += 1
            self._pids.pop(pid, None)
        return leases, readers, procs

    def _terminate(self, pid: int) -> tuple[int, int]:
        own = pid == self._own_pid  # this process's leases are not indexed
        keys = self._own_leases(pid) if own else self._by_pid.pop(pid, set())
        for lid, cid in list(keys):
            self._end_lease(lid, cid, unindex=False)
        holds = [hid for hid, (_, hpid) in self._readers.items() if hpid == pid]
        for hid in holds:
            self._release_reader(hid)
        return len(keys), len(holds)

    def _note_pid(self, pid: int) -> None:
        if pid not in self._pids:
            self._pids[pid] = process_start_time(pid)

    def _hold(
        self,
        cid: ContentId,
        lid: LeaseId,
        ttl: float | None,
        detached: bool,
        blob: _Blob,
    ) -> None:
        """Hold ``lid`` on ``cid`` (whose record is ``blob``); a no-op if held."""
        # A hot path (every acquire): lookups are kept few and inlined.
        if ttl is None:
            held = len(blob)
            blob.setdefault(lid, _DETACHED if detached else _PLAIN)  # one hash of lid
            if len(blob) == held:
                return
        else:
            if lid in blob:
                return
            expires_at = policy_rules.expires_at(ttl, time.time())
            assert expires_at is not None
            blob[lid] = _Lease(expires_at, detached)
            heapq.heappush(self._expiries, (expires_at, str(lid), lid, cid))
        if not detached and lid.pid != self._own_pid:
            pid = lid.pid
            if pid not in self._pids:
                self._note_pid(pid)
            keys = self._by_pid.get(pid)
            if keys is None:
                keys = self._by_pid[pid] = set()
            keys.add((lid, cid))
        if self._retained and cid in self._retained:
            del self._retained[cid]
            self._retained_bytes -= blob.size
        self._touch(cid, blob)

    def _touch(self, cid: ContentId, blob: _Blob) -> None:
        now = time.time()
        if not 0.0 <= now - self._stamp < _STAMP_RESOLUTION:  # (the clock may step back)
            self._stamp = now
        blob.last_access = self._stamp
        if self._track_order:
            self._order.move_to_end(cid)

    def _end_lease(self, lid: LeaseId, cid: ContentId, *, unindex: bool = True) -> None:
        # A hot path (every drop).
        blob = self._blobs.get(cid)
        if blob is None:
            return
        lease = blob.pop(lid, None)
        if lease is None:
            return
        if unindex and not lease.detached and lid.pid != self._own_pid:
            self._unindex(lid, cid)
        if not blob and not blob.readers:
            self._maybe_unreferenced(cid, blob)

    def _unindex(self, lid: LeaseId, cid: ContentId) -> None:
        """Remove another process's lease from the index by pid."""
        keys = self._by_pid.get(lid.pid)
        if keys is not None:
            keys.discard((lid, cid))
            if not keys:
                del self._by_pid[lid.pid]

    def _release_reader(self, hold_id: int) -> None:
        entry = self._readers.pop(hold_id, None)
        if entry is None:
            return
        cid = entry[0]
        blob = self._blobs.get(cid)
        if blob is None:
            return
        blob.readers -= 1
        self._maybe_unreferenced(cid, blob)

    def _maybe_unreferenced(self, cid: ContentId, blob: _Blob) -> None:
        if blob or blob.readers:  # a blob is true while it has leases
            return
        size = blob.size
        if policy_rules.retains(size, self.policies.retain_bytes):
            self._retained[cid] = None
            self._retained_bytes += size
            self._trim_retained(self.policies.retain_bytes)
        else:
            self._delete(cid)

    def _trim_retained(self, budget: int) -> tuple[int, int]:
        count = freed = 0
        if self._retained_bytes <= budget:
            return count, freed
        retained = ((cid, self._blobs[cid].size) for cid in self._retained)
        for cid in policy_rules.over_retain_budget(self._retained_bytes, budget, retained):
            freed += self._delete(cid)
            count += 1
        return count, freed

    def _delete(self, cid: ContentId) -> int:
        blob = self._blobs.pop(cid)
        self._order.pop(cid, None)
        if cid in self._retained:
            del self._retained[cid]
            self._retained_bytes -= blob.size
        for lid, lease in blob.items():
            if not lease.detached and lid.pid != self._own_pid:
                self._unindex(lid, cid)
        self._bytes -= blob.size
        return blob.size

    def _make_room(self, size: int) -> None:
        """Evict per policy so ``size`` more bytes fit, or raise StoreFull
        having changed nothing."""
        limit = self.policies.max_bytes
        if limit is None or self._bytes + size <= limit:
            return
        if size > limit:
            raise StoreFull(policy_rules.too_large_message(size, limit))
        retained = ((cid, self._blobs[cid].size) for cid in self._retained)
        leased = (
            (cid, blob.size, bool(blob.readers))
            for cid, blob in ((cid, self._blobs[cid]) for cid in self._order)
            if cid not in self._retained
        )
        victims = policy_rules.plan_eviction(
            self._bytes + size - limit, retained, leased, self.policies.on_full
        )
        if victims is None:
            raise StoreFull(
                policy_rules.over_limit_message(size, limit, self._bytes, self.policies.on_full)
            )
        for cid in victims:
            self._delete(cid)

    def _leased_blob(self, cid: ContentId, lid: LeaseId) -> _Blob:
        self._maintain()
        blob = self._blobs.get(cid)
        if blob is None or lid not in blob:
            raise self._lease_expired(cid, lid)
        self._touch(cid, blob)
        if len(blob.data) != blob.size:
            raise IntegrityError(
                f"blob {cid} holds {len(blob.data)} bytes, not its recorded {blob.size}"
            )
        if self.policies.verify_reads:
            check_hash(cid, blob.data)
        return blob

    # -- the backend methods ---------------------------------------------------

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
            blob = self._blobs.get(cid)
            if blob is not None:
                if lid in blob:
                    return
                self._dedup_hits += 1
                self._hold(cid, lid, ttl, detached, blob)
                return
        if not hashed:
            check_hash(cid, data)
        owner = data.obj
        # bytes are immutable: a whole bytes object is kept as it is, not copied
        copy = owner if type(owner) is bytes and len(owner) == data.nbytes else bytes(data)
        with self._lock:
            self._maintain()
            blob = self._blobs.get(cid)
            if blob is not None:
                self._dedup_hits += 1
                self._hold(cid, lid, ttl, detached, blob)
                return
            self._make_room(len(copy))
            self._stamp = now = time.time()
            blob = self._blobs[cid] = _Blob(copy, len(copy), now, now)
            if self._track_order:
                self._order[cid] = None
            self._bytes += len(copy)
            self._hold(cid, lid, ttl, detached, blob)

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
            if self._closed or self._expiries or time.monotonic() >= self._next_reap:
                self._maintain()
            blob = self._blobs.get(cid)
            if blob is None:
                raise ContentNotFound(cid)
            self._hold(cid, lid, ttl, detached, blob)
            return blob.size

    def _take_over_lease(self, cid: ContentId, old: LeaseId, new: LeaseId) -> int | None:
        with self._lock:
            self._maintain()
            blob = self._blobs.get(cid)
            if blob is None:
                return None
            # under the lock: nobody sees the content held by neither lease
            self._hold(cid, new, None, False, blob)
            self._end_lease(old, cid)
            return blob.size

    def _get_data(self, cid: ContentId, lid: LeaseId) -> bytes:
        with self._lock:
            return self._leased_blob(cid, lid).data

    def _get_reader(self, cid: ContentId, lid: LeaseId) -> BlobReader:
        with self._lock:
            blob = self._leased_blob(cid, lid)
            hold_id = next(self._reader_ids)
            self._readers[hold_id] = (cid, os.getpid())
            blob.readers += 1
            data = blob.data

        def release() -> None:
            with self._lock:
                if not self._closed:
                    self._release_reader(hold_id)

        return BlobReader(BufferSource(memoryview(data)), len(data), release)

    def _advise_lease_dropped(self, lid: LeaseId, cid: ContentId) -> None:
        with self._lock:
            if self._closed or self._expiries or time.monotonic() >= self._next_reap:
                self._maintain()
            self._end_lease(lid, cid)

    def _advise_of_pid(self, pid: int) -> None:
        with self._lock:
            self._maintain()
            start = process_start_time(pid)
            if start is None:
                return
            if not same_start(self._pids.get(pid), start):  # the pid was reused
                self._terminate(pid)
            self._pids[pid] = start

    def _advise_pid_terminated(self, pid: int) -> None:
        with self._lock:
            self._maintain()
            self._terminate(pid)
            self._pids.pop(pid, None)

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

    def _collect(self) -> CollectReport:
        with self._lock:
            self._check_open()
            before_blobs, before_bytes = len(self._blobs), self._bytes
            expired = self._expire()
            leases, readers, procs = self._reap_dead()
            self._trim_retained(self.policies.retain_bytes)
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
            hasher = new_hasher(cid.algorithm)
            hasher.update(blob.data)
            if len(blob.data) != blob.size or hasher.digest() != cid.digest:
                report.corrupted.append(cid)
        if repair and report:
            with self._lock:
                for cid in report.corrupted:
                    if cid in self._blobs:
                        self._delete(cid)
            report.repaired = True
        return report

    def _stats(self) -> StorageStats:
        with self._lock:
            self._maintain()
            owners = {lid.pid for blob in self._blobs.values() for lid in blob}
            owners.update(p for _, p in self._readers.values())
            pids = {pid for pid in owners if is_alive(pid, self._pids.get(pid))}
            return StorageStats(
                blobs=len(self._blobs),
                bytes=self._bytes,
                leases=sum(map(len, self._blobs.values())),
                processes=len(pids),
                dedup_hits=self._dedup_hits,
                readers=len(self._readers),
                retained_blobs=len(self._retained),
                retained_bytes=self._retained_bytes,
            )

    def _close(self) -> None:
        with self._lock:
            self._closed = True

    # -- test support ----------------------------------------------------------

    def _corrupt_for_tests(self, cid: ContentId, data: bytes) -> None:
        """Replace a blob's bytes in place (the conformance suite's fault hook)."""
        with self._lock:
            self._blobs[cid].data = data
