"""Row 11: lease_by_content latency while others churn and collect() runs.

Four processes churn on one DirectoryStorage (store a small blob, lease it by
content, read it, drop both leases) and a fifth runs ``collect()`` every
second on a store that holds many other blobs (so that each collect has
thousands of rows and files to check). Every churner times each
``lease_by_content``; the baseline is one churner alone on the same store,
with nobody else working (idle). Issue 12: p99 under churn <= 10x idle p99.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from multiprocessing.connection import Connection
from typing import Any

from blobleases import LeaseId

from .backends import directory_storage, remove_store
from .harness import Context, Target, count_text

__all__ = ["latency_rows"]

#: per mode: (blobs held while collect runs, seconds measured idle, seconds under churn)
_SIZES = {"full": (20_000, 8.0, 12.0), "quick": (10_000, 4.0, 6.0), "tiny": (300, 0.5, 1.5)}
_CHURNERS = 4
_BLOB = 4096


def _churn(path: str, seconds: float, conn: Connection) -> None:
    """Child: store, lease by content, read, drop, for ``seconds``; send the
    lease_by_content times (seconds)."""
    try:
        storage = directory_storage()(path)
        payload = os.urandom(_BLOB - 16)
        salt = os.urandom(8)
        samples: list[float] = []
        clock = time.perf_counter
        conn.send("ready")
        conn.recv()  # start
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            i += 1
            lid = LeaseId.new()
            cid = storage.store_bytes(salt + i.to_bytes(8, "little") + payload, lid)
            other = LeaseId.new()
            t0 = clock()
            storage.lease_by_content(cid, other)
            samples.append(clock() - t0)
            storage.get_data(cid, other)
            storage.advise_lease_dropped(other, cid)
            storage.advise_lease_dropped(lid, cid)
        storage.close()
        conn.send(("ok", samples))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _collector(path: str, conn: Connection) -> None:
    """Child: collect() every second until told to stop; send the durations."""
    try:
        storage = directory_storage()(path)
        durations: list[float] = []
        conn.send("ready")
        conn.recv()  # start
        while not conn.poll(0):
            t0 = time.perf_counter()
            storage.collect()
            took = time.perf_counter() - t0
            durations.append(took)
            if conn.poll(max(0.0, 1.0 - took)):
                break
        conn.recv()
        storage.close()
        conn.send(("ok", durations))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _run(
    path: str, churners: int, seconds: float, collect: bool
) -> tuple[list[float], list[float]]:
    """Start the processes, let them work ``seconds``: (lease times, collect times)."""
    mp = multiprocessing.get_context("fork")
    procs: list[Any] = []
    pipes: list[Connection] = []
    try:
        for _ in range(churners):
            parent, child = mp.Pipe()
            proc = mp.Process(target=_churn, args=(path, seconds, child))
            proc.start()
            child.close()
            procs.append(proc)
            pipes.append(parent)
        collector: Connection | None = None
        if collect:
            collector, child = mp.Pipe()
            proc = mp.Process(target=_collector, args=(path, child))
            proc.start()
            child.close()
            procs.append(proc)
        for conn in [*pipes, *([collector] if collector else [])]:
            if not conn.poll(120) or conn.recv() != "ready":
                raise RuntimeError("a benchmark process did not start")
        for conn in [*pipes, *([collector] if collector else [])]:
            conn.send("start")
        samples: list[float] = []
        for conn in pipes:
            if not conn.poll(seconds + 600):
                raise RuntimeError("a churning process did not finish")
            status, value = conn.recv()
            if status != "ok":
                raise RuntimeError(f"a churning process failed: {value}")
            samples.extend(value)
        durations: list[float] = []
        if collector is not None:
            collector.send("stop")
            if not collector.poll(600):
                raise RuntimeError("the collecting process did not finish")
            status, value = collector.recv()
            if status != "ok":
                raise RuntimeError(f"the collecting process failed: {value}")
            durations = value
        return samples, durations
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_rows(ctx: Context) -> None:
    held, idle_seconds, churn_seconds = _SIZES[ctx.sizes.mode]
    what = (
        f"lease_by_content, {_CHURNERS} processes churning + collect() every 1 s, "
        f"{count_text(held)} blobs, DirectoryStorage"
    )
    baseline = "same, 1 process on an idle store"
    rows = {
        "p50": ctx.row(f"11a p50 {what}", "ms", baseline, higher_is_better=False),
        "p99": ctx.row(
            f"11b p99 {what}",
            "ms",
            baseline,
            Target(">=", 0.1, label="<= 10x idle p99"),
            higher_is_better=False,
        ),
        "max": ctx.row(f"11c max {what}", "ms", baseline, higher_is_better=False),
    }
    ds = directory_storage()
    path = ctx.path("latency")
    storage = None
    try:
        storage = ds(path)
        payload = os.urandom(_BLOB - 16)
        t0 = time.perf_counter()
        for i in range(held):
            storage.store_bytes(
                b"held" + i.to_bytes(12, "little") + payload, LeaseId.new(), detached=True
            )
        ctx.log(f"    stored {count_text(held)} blobs in {time.perf_counter() - t0:.1f} s")
        idle, _ = _run(path, 1, idle_seconds, collect=False)
        busy, collects = _run(path, _CHURNERS, churn_seconds, collect=True)
    finally:
        remove_store(storage, path)
    for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
        rows[name].value = _quantile(busy, q) * 1e3
        rows[name].baseline_value = _quantile(idle, q) * 1e3
    median_collect = statistics.median(collects) * 1e3 if collects else float("nan")
    note = (
        f"{count_text(len(busy))} leases timed under churn, {count_text(len(idle))} idle; "
        f"{len(collects)} collect() calls, median {median_collect:.0f} ms each"
    )
    for row in rows.values():
        row.note = note
