"""Rows 1-4: store, get_data, small store+drop and lease acquire+drop, in one process."""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
import threading
from typing import Any

from blobleases import BlobLease, BlobManager, BlobStorage, ContentId, LeaseId, MemoryStorage

from .backends import directory_storage, remove_store
from .harness import (
    Context,
    MiB,
    Target,
    Unavailable,
    UniqueBlobs,
    interleave,
    per_op,
    size_text,
)
from .workloads import lease_pairs

__all__ = ["get_rows", "lease_rows", "small_rows", "store_rows"]


def _diskcache() -> object:
    try:
        import diskcache  # type: ignore[import-untyped]
    except ImportError as exc:
        raise Unavailable("diskcache is not installed (pip install diskcache)") from exc
    return diskcache


def raw_store(root: str, data: bytes) -> str:
    """The raw baseline: sha256, write a temporary file, rename it into place."""
    name = hashlib.sha256(data).hexdigest()
    fd, tmp = tempfile.mkstemp(dir=root)
    with open(fd, "wb") as f:
        f.write(data)
    path = os.path.join(root, name)
    os.replace(tmp, path)
    return path


def _three_stores(ctx: Context, name: str) -> tuple[BlobStorage, str, Any]:
    """What rows 1 and 2 compare: a DirectoryStorage, a directory for the
    raw baseline and a diskcache.Cache, new under the scratch directory."""
    ds = directory_storage()
    diskcache = _diskcache()
    storage: BlobStorage = ds(ctx.path(f"{name}-ds"))
    raw_root = ctx.path(f"{name}-raw")
    os.makedirs(raw_root)
    cache = diskcache.Cache(ctx.path(f"{name}-diskcache"))  # type: ignore[attr-defined]
    return storage, raw_root, cache


def store_rows(ctx: Context) -> None:
    s = ctx.sizes
    size = size_text(s.blob)
    r_raw = ctx.row(
        f"1a store {size}, DirectoryStorage, BlobManager.store",
        "MiB/s",
        "sha256+tempfile+os.replace",
        Target(">=", 0.9),
    )
    r_dc = ctx.row(
        f"1b store {size}, DirectoryStorage, BlobManager.store",
        "MiB/s",
        "diskcache.Cache.set",
        Target(">=", 2.0),
    )
    storage, raw_root, cache = _three_stores(ctx, "store")
    blobs = UniqueBlobs(s.blob)
    mgr = BlobManager(storage)
    keys = itertools.count()
    try:

        def candidate() -> float:
            batch = blobs.make(s.store_batch)
            leases: list[BlobLease] = []
            per = per_op(len(batch), lambda: leases.extend(mgr.store(b) for b in batch))
            for lease in leases:
                lease.close()
            return per

        def raw() -> float:
            batch = blobs.make(s.store_batch)
            paths: list[str] = []
            per = per_op(len(batch), lambda: paths.extend(raw_store(raw_root, b) for b in batch))
            for p in paths:
                os.unlink(p)
            return per

        def disk_cache() -> float:
            batch = blobs.make(s.store_batch)

            def run() -> None:
                for b in batch:
                    cache.set(next(keys), b)

            per = per_op(len(batch), run)
            cache.clear()
            return per

        c, r, d = interleave(s.reps, [candidate, raw, disk_cache])
        mib = s.blob / MiB
        r_raw.value = r_dc.value = mib / ctx.summary(c)
        r_raw.baseline_value = mib / ctx.summary(r)
        r_dc.baseline_value = mib / ctx.summary(d)
    finally:
        cache.close()
        remove_store(storage)


def get_rows(ctx: Context) -> None:
    s = ctx.sizes
    size = size_text(s.blob)
    r_raw = ctx.row(
        f"2a get_data {size} warm, DirectoryStorage, BlobLease.get_data",
        "MiB/s",
        "open+read",
        Target(">=", 0.9),
    )
    r_dc = ctx.row(
        f"2b get_data {size} warm, DirectoryStorage, BlobLease.get_data",
        "MiB/s",
        "diskcache.Cache.get",
        Target(">=", 1.0),
    )
    storage, raw_root, cache = _three_stores(ctx, "get")
    try:
        distinct = 16
        batch = UniqueBlobs(s.blob).make(distinct)
        mgr = BlobManager(storage)
        leases = [mgr.store(b) for b in batch]
        paths = [raw_store(raw_root, b) for b in batch]
        for i, b in enumerate(batch):
            cache.set(i, b)
        del batch
        n = s.read_batch

        def candidate() -> float:
            def run() -> None:
                for i in range(n):
                    leases[i % distinct].get_data()

            return per_op(n, run)

        def raw() -> float:
            def run() -> None:
                for i in range(n):
                    with open(paths[i % distinct], "rb") as f:
                        f.read()

            return per_op(n, run)

        def disk_cache() -> float:
            def run() -> None:
                for i in range(n):
                    cache.get(i % distinct)

            return per_op(n, run)

        c, r, d = interleave(s.reps, [candidate, raw, disk_cache])
        mib = s.blob / MiB
        r_raw.value = r_dc.value = mib / ctx.summary(c)
        r_raw.baseline_value = mib / ctx.summary(r)
        r_dc.baseline_value = mib / ctx.summary(d)
        for lease in leases:
            lease.close()
    finally:
        cache.close()
        remove_store(storage)


def small_rows(ctx: Context) -> None:
    s = ctx.sizes
    size = size_text(s.small)
    row = ctx.row(
        f"3 store+drop {size}, DirectoryStorage, BlobManager.store+close",
        "cycles/s",
        "diskcache set+delete",
        Target(">=", 2.0),
    )
    ds = directory_storage()
    diskcache = _diskcache()
    storage: BlobStorage = ds(ctx.path("small-ds"))
    cache = diskcache.Cache(ctx.path("small-diskcache"))  # type: ignore[attr-defined]
    blobs = UniqueBlobs(s.small)
    mgr = BlobManager(storage)
    keys = itertools.count()
    try:

        def candidate() -> float:
            batch = blobs.make(s.small_batch)

            def run() -> None:
                for b in batch:
                    mgr.store(b).close()

            return per_op(len(batch), run)

        def disk_cache() -> float:
            batch = blobs.make(s.small_batch)

            def run() -> None:
                for b in batch:
                    k = next(keys)
                    cache.set(k, b)
                    cache.delete(k)

            return per_op(len(batch), run)

        c, d = interleave(s.reps, [candidate, disk_cache])
        row.value = 1 / ctx.summary(c)
        row.baseline_value = 1 / ctx.summary(d)
    finally:
        cache.close()
        remove_store(storage)


def dict_pairs(cid: ContentId, lids: list[LeaseId]) -> float:
    """The baseline: a dict insert and delete, each under a lock."""
    lock = threading.Lock()
    table: dict[tuple[LeaseId, ContentId], None] = {}

    def run() -> None:
        for lid in lids:
            with lock:
                table[(lid, cid)] = None
            with lock:
                del table[(lid, cid)]

    return per_op(len(lids), run)


def lease_rows(ctx: Context) -> None:
    s = ctx.sizes
    baseline = "dict insert+delete, lock"
    r_ds = ctx.row(
        "4a lease acquire+drop, DirectoryStorage",
        "pairs/s",
        baseline,
        Target(">=", 50_000, on="value", unit="pairs/s"),
    )
    r_mem = ctx.row(
        "4b lease acquire+drop, MemoryStorage",
        "pairs/s",
        baseline,
        Target(">=", 500_000, on="value", unit="pairs/s"),
    )
    n = s.lease_batch
    lids = [LeaseId.new() for _ in range(n)]
    memory = MemoryStorage()
    holder = LeaseId.new()
    mem_cid = memory.store_bytes(b"lease benchmark content", holder)
    # Short repetitions (tens of ms): twice as many, to ride out other tenants' bursts.
    c_mem, d_mem = interleave(
        2 * s.reps, [lambda: lease_pairs(memory, mem_cid, lids), lambda: dict_pairs(mem_cid, lids)]
    )
    r_mem.value = 1 / ctx.summary(c_mem)
    r_mem.baseline_value = 1 / ctx.summary(d_mem)
    memory.close()

    ds = directory_storage()
    storage: BlobStorage = ds(ctx.path("lease-ds"))
    try:
        cid = storage.store_bytes(b"lease benchmark content", holder)
        c_ds, d_ds = interleave(
            s.reps, [lambda: lease_pairs(storage, cid, lids), lambda: dict_pairs(cid, lids)]
        )
        r_ds.value = 1 / ctx.summary(c_ds)
        r_ds.baseline_value = 1 / ctx.summary(d_ds)
    finally:
        remove_store(storage)
