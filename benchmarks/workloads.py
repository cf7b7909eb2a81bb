"""What several rows time the same way, against whichever backend and
baseline client they are given."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from blobleases import BlobLease, BlobManager, BlobStorage, ContentId, LeaseId

from .harness import per_op

__all__ = ["lease_pairs", "put_get", "store_get"]


def store_get(mgr: BlobManager, batch: list[bytes]) -> float:
    """Seconds per blob to store each of ``batch`` through ``mgr`` and read
    it back whole (``get_data``); the leases are closed after the timing."""
    leases: list[BlobLease] = []

    def run() -> None:
        for b in batch:
            lease = mgr.store(b)
            lease.get_data()
            leases.append(lease)

    per = per_op(len(batch), run)
    for lease in leases:
        lease.close()
    return per


def put_get(
    batch: list[bytes],
    keys: Iterator[str],
    put: Callable[[str, bytes], object],
    get: Callable[[str], object],
    delete: Callable[[list[str]], object],
) -> float:
    """The raw baseline of :func:`store_get`: seconds per blob to ``put``
    each of ``batch`` under a new key and ``get`` it back; the keys are
    deleted after the timing."""
    names: list[str] = []

    def run() -> None:
        for b in batch:
            key = next(keys)
            put(key, b)
            get(key)
            names.append(key)

    per = per_op(len(batch), run)
    delete(names)
    return per


def lease_pairs(storage: BlobStorage, cid: ContentId, lids: list[LeaseId]) -> float:
    """Seconds per acquire+drop pair, one pass over ``lids``."""
    lease_by_content = storage.lease_by_content
    drop = storage.advise_lease_dropped

    def run() -> None:
        for lid in lids:
            lease_by_content(cid, lid)
            drop(lid, cid)

    return per_op(len(lids), run)
