"""MemoryStorage: blobs in this process's memory, safe from many threads.

The reference backend, and an adapter only: how memory keeps blobs, leases,
the LRU and the retained set, as the verbs of
:class:`blobleases.adapter_storage.AdapterStorage` (which runs every rule of
SPEC sections 2 and 3 through :class:`blobleases.engine.Engine` under one
lock). Readers are zero-copy memoryviews.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .adapter_storage import AdapterStorage
from .content_id import ContentId
from .lease_id import LeaseId
from .reports import BlobInfo, LeaseInfo

__all__ = ["MemoryStorage"]


#: Accesses within this many seconds share one time (one float object, and
#: one lease record for the leases without a ttl taken then), so recording
#: an access frees no float stored long ago and allocates nothing.
_STAMP_RESOLUTION = 0.001


@dataclass(frozen=True, slots=True)
class _Lease:
    expires_at: float | None
    detached: bool
    created: float


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


class MemoryStorage(AdapterStorage):
    """Blobs held in this process (threads share it; other processes do not).

    Takes every policy keyword of :class:`~blobleases.policies.Policies`;
    ``durability`` has no effect (nothing outlives the process).
    """

    shareable = False

    def __init__(self, **policies: Any) -> None:
        # (before the base registers the fork hook, which reads them)
        self._blobs: dict[ContentId, _Blob] = {}
        # Non-detached leases by pid, for reaping. This process's own leases
        # are not indexed (it never reaps itself; terminating it scans).
        self._by_pid: dict[int, set[tuple[ContentId, LeaseId]]] = {}
        super().__init__(**policies)
        self._order: OrderedDict[ContentId, None] = OrderedDict()  # LRU: oldest first
        self._retained: OrderedDict[ContentId, None] = OrderedDict()
        self._retained_total = 0
        self._bytes = 0
        self._tick(time.time())
        # Access order only decides evictions, which need a max_bytes.
        self._track_order = self.policies.max_bytes is not None

    def _after_fork(self) -> None:
        parent = self._own_pid
        super()._after_fork()
        inherited = set(self._scan(parent))
        if inherited:
            self._by_pid[parent] = inherited

    @property
    def url(self) -> str:
        return "memory://"

    # -- content, leases and the LRU (blobleases.engine.Adapter) --------------------

    def add_content(self, key: ContentId, size: int, payload: Any) -> None:
        self._tick(time.time())
        self._blobs[key] = _Blob(payload, size, self._stamp)
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
        now = time.time()  # (the access, as _touch records it: inlined)
        if not 0.0 <= now - self._stamp < _STAMP_RESOLUTION:
            self._tick(now)
        if expires_at is None:
            held = len(blob)
            blob.setdefault(lid, self._detached if detached else self._plain)  # one hash of lid
            if len(blob) == held:
                return blob.size
        else:
            if lid in blob:
                return blob.size
            blob[lid] = _Lease(expires_at, detached, self._stamp)
            self._expiries.push(expires_at, key, lid)
        if not detached and lid.pid != self._own_pid:
            self._record_pid_of(lid.pid)
            keys = self._by_pid.get(lid.pid)
            if keys is None:
                keys = self._by_pid[lid.pid] = set()
            keys.add((key, lid))
        if self._retained and key in self._retained:
            del self._retained[key]
            self._retained_total -= blob.size
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

    def owner_leases(self, owner: int, limit: int) -> list[tuple[ContentId, LeaseId]]:
        if owner == self._own_pid:  # this process's leases are not indexed
            return list(itertools.islice(self._scan(owner), limit))
        return list(itertools.islice(self._by_pid.get(owner, ()), limit))

    def expired_batch(self, now: float, limit: int) -> list[tuple[ContentId, LeaseId]]:
        expired: list[tuple[ContentId, LeaseId]] = []
        if limit <= 0:
            return expired
        for expires_at, key, lid in self._expiries.due(now):
            blob = self._blobs.get(key)
            lease = None if blob is None else blob.get(lid)
            if lease is not None and lease.expires_at == expires_at:
                expired.append((key, lid))
                if len(expired) >= limit:
                    break  # the rest stay queued
        return expired

    def owner_pids(self) -> set[int]:
        pids = set(self._by_pid) | {pid for _, pid in self._holds.values()}
        pids.discard(self._own_pid)  # alive: it is running this
        return pids

    def unreferenced_size(self, key: ContentId) -> int | None:
        blob = self._blobs.get(key)
        if blob is None or blob or blob.readers or key in self._retained:
            return None
        return blob.size

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

    # -- reads and facts (AdapterStorage) ---------------------------------------------

    def leased_payload(self, key: ContentId, lid: LeaseId) -> tuple[bytes, int] | None:
        blob = self._blobs.get(key)
        if blob is None or lid not in blob:
            return None
        now = time.time()
        if not 0.0 <= now - self._stamp < _STAMP_RESOLUTION:  # (the clock may step back)
            self._tick(now)
        blob.last_access = self._stamp
        if self._track_order:
            self._order.move_to_end(key)
        return blob.data, blob.size

    def add_reader(self, key: ContentId) -> None:
        self._blobs[key].readers += 1

    def remove_reader(self, key: ContentId) -> bool:
        blob = self._blobs.get(key)
        if blob is None:
            return False
        blob.readers -= 1
        return not blob and not blob.readers

    def has_content(self, key: ContentId) -> bool:
        return key in self._blobs

    def blob_info(self, key: ContentId) -> BlobInfo | None:
        blob = self._blobs.get(key)
        if blob is None:
            return None
        return BlobInfo(key, blob.size, len(blob), blob.readers, blob.created, blob.last_access)

    def lease_infos(self, key: ContentId | None, host: str | None = None) -> list[LeaseInfo]:
        blobs = self._blobs.items() if key is None else [(key, self._blobs[key])]
        return [
            LeaseInfo(lid, cid, lid.pid, lease.expires_at, lease.detached, lease.created, host)
            for cid, blob in blobs
            for lid, lease in blob.items()
        ]

    def stored_payloads(self) -> list[tuple[ContentId, bytes, int]]:
        return [(key, blob.data, blob.size) for key, blob in self._blobs.items()]

    def counts(self) -> tuple[int, int, int]:
        return len(self._blobs), sum(map(len, self._blobs.values())), len(self._retained)

    def lease_pids(self) -> set[int]:
        return {lid.pid for blob in self._blobs.values() for lid in blob}

    # -- internal helpers (call with the lock held) -------------------------------

    def _tick(self, now: float) -> None:
        """``now`` is the time recorded for accesses and new leases."""
        self._stamp = now
        self._plain = _Lease(None, False, now)  # shared by the leases without a ttl
        self._detached = _Lease(None, True, now)

    def _scan(self, pid: int) -> Iterator[tuple[ContentId, LeaseId]]:
        """Every non-detached lease of ``pid``, by scanning (``pid`` is not indexed)."""
        for key, blob in self._blobs.items():
            for lid, lease in blob.items():
                if lid.pid == pid and not lease.detached:
                    yield key, lid

    def _unindex(self, key: ContentId, lid: LeaseId) -> None:
        """Remove another process's lease from the index by pid."""
        keys = self._by_pid.get(lid.pid)
        if keys is not None:
            keys.discard((key, lid))
            if not keys:
                del self._by_pid[lid.pid]

    def _corrupt_for_tests(self, cid: ContentId, data: bytes) -> None:
        """Replace a blob's bytes in place (the conformance suite's fault hook)."""
        with self._lock:
            self._blobs[cid].data = data
