"""Rows 7 and 8: reaping a SIGKILLed process's leases, and lease cost at scale."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from blobleases import BlobStorage, ContentId, LeaseId, MemoryStorage

from .backends import directory_storage, remove_store
from .harness import Context, Target, count_text, interleave, per_op

__all__ = ["reap_rows", "scale_rows"]


def _hold_leases(path: str, n: int, salt: bytes, conn: Connection) -> None:
    """Child: store ``n`` distinct blobs, each under its own lease, then wait to be killed."""
    try:
        ds = directory_storage()
        storage: BlobStorage = ds(path)
        t0 = time.perf_counter()
        for i in range(n):
            storage.store_bytes(salt + i.to_bytes(8, "little"), LeaseId.new())
        conn.send(("ready", time.perf_counter() - t0))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    time.sleep(3600)


def reap_rows(ctx: Context) -> None:
    s = ctx.sizes
    n = s.reap_leases
    row = ctx.row(
        f"7 collect() after SIGKILL, {count_text(n)} leases, DirectoryStorage",
        "s",
        "creating them (store_bytes)",
        Target("<=", 1.0, on="value", unit="s"),
        higher_is_better=False,
    )
    ds = directory_storage()
    mp = multiprocessing.get_context("fork")
    collect_times: list[float] = []
    create_times: list[float] = []
    notes: list[str] = []
    for rep in range(s.reap_reps):
        path = ctx.path(f"reap-{rep}")
        os.makedirs(path, mode=0o700)
        storage: BlobStorage | None = None
        parent, child = mp.Pipe()
        proc = mp.Process(target=_hold_leases, args=(path, n, os.urandom(16), child))
        proc.start()
        child.close()
        try:
            if not parent.poll(600):
                raise RuntimeError("the child did not finish storing within 600 s")
            status, value = parent.recv()
            if status != "ready":
                raise RuntimeError(f"child failed: {value}")
            create_times.append(value)
            storage = ds(path)
            before = storage.stats()
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            t0 = time.perf_counter()
            report = storage.collect()
            collect_times.append(time.perf_counter() - t0)
            after = storage.stats()
            if report.leases_reaped < n or after.leases or after.blobs:
                raise RuntimeError(
                    f"collect() reaped {report.leases_reaped} of {n} leases; "
                    f"{after.leases} leases and {after.blobs} blobs remain"
                )
            notes.append(
                f"{before.leases} leases/{before.blobs} blobs before; collect reaped "
                f"{report.leases_reaped}, deleted {report.blobs_deleted} blobs"
            )
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join()
            parent.close()
            remove_store(storage, path)
    row.value = ctx.summary(collect_times)
    row.baseline_value = ctx.summary(create_times)
    row.note = notes[-1] if notes else ""


def _populate(storage: BlobStorage, n: int, tag: bytes) -> list[ContentId]:
    """``n`` distinct small blobs, each held by its own lease of this process."""
    cids = []
    store = storage.store_bytes
    for i in range(n):
        cids.append(store(tag + i.to_bytes(8, "little"), LeaseId.new()))
    return cids


def _scale(
    ctx: Context, name: str, small: BlobStorage, large: BlobStorage, row: Any
) -> list[Callable[[], float]]:
    s = ctx.sizes
    t0 = time.perf_counter()
    small_cids = _populate(small, s.scale_small, b"scale-small-" + name.encode())
    t1 = time.perf_counter()
    large_cids = _populate(large, s.scale_large, b"scale-large-" + name.encode())
    t2 = time.perf_counter()
    row.note = (
        f"populated {count_text(s.scale_small)} in {t1 - t0:.1f} s "
        f"and {count_text(s.scale_large)} in {t2 - t1:.1f} s ({name})"
    )
    ctx.log(f"    {row.note}")
    rng = random.Random(7)
    n = s.scale_batch
    lids = [LeaseId.new() for _ in range(n)]
    small_pick = [rng.choice(small_cids) for _ in range(n)]
    large_pick = [rng.choice(large_cids) for _ in range(n)]

    def spread(storage: BlobStorage, picks: list[ContentId]) -> Callable[[], float]:
        # acquire+drop pairs on randomly chosen present content
        acquire, drop = storage.lease_by_content, storage.advise_lease_dropped

        def pairs() -> None:
            for cid, lid in zip(picks, lids, strict=True):
                acquire(cid, lid)
                drop(lid, cid)

        return lambda: per_op(n, pairs)

    return [spread(large, large_pick), spread(small, small_pick)]


def scale_rows(ctx: Context) -> None:
    s = ctx.sizes
    large, small = count_text(s.scale_large), count_text(s.scale_small)
    label = "" if s.mode == "full" else f" ({s.mode} mode)"
    target = Target(">=", 1 / 1.5, label=">= 0.67x (<= 1.5x slower)")
    r_ds = ctx.row(
        f"8a acquire+drop, {large} blobs+leases{label}, DirectoryStorage",
        "us/pair",
        f"same, {small} blobs+leases",
        target,
        higher_is_better=False,
    )
    r_mem = ctx.row(
        f"8b acquire+drop, {large} blobs+leases{label}, MemoryStorage",
        "us/pair",
        f"same, {small} blobs+leases",
        target,
        higher_is_better=False,
    )
    mem_small, mem_large = MemoryStorage(), MemoryStorage()
    try:
        big, little = interleave(s.scale_reps, _scale(ctx, "memory", mem_small, mem_large, r_mem))
        r_mem.value = ctx.summary(big) * 1e6
        r_mem.baseline_value = ctx.summary(little) * 1e6
    finally:
        mem_small.close()
        mem_large.close()
        del mem_small, mem_large
    ds = directory_storage()
    small_path, large_path = ctx.path("scale-small"), ctx.path("scale-large")
    ds_small = ds_large = None
    try:
        ds_small, ds_large = ds(small_path), ds(large_path)
        big, little = interleave(
            s.scale_reps, _scale(ctx, "DirectoryStorage", ds_small, ds_large, r_ds)
        )
        r_ds.value = ctx.summary(big) * 1e6
        r_ds.baseline_value = ctx.summary(little) * 1e6
    finally:
        remove_store(ds_small, small_path)
        remove_store(ds_large, large_path)
