"""Row 11: lease_by_content latency while others churn and collect() runs.

Four processes churn on one DirectoryStorage (store a small blob, lease it by
content, read it, drop both leases), each at a steady pace of
``_CHURN_RATE`` cycles a second, and a fifth runs ``collect()`` every second
on a store that holds many other blobs (so that each collect has thousands
of rows and files to check). A sixth process times ``lease_by_content`` (and
drops the lease) every millisecond; the baseline is the same process on the
same store with nobody else working (idle). Issue 12: p99 under churn <= 10x
idle p99.

The churners are paced, as real workers are (they do work between store
operations): unpaced, four busy loops plus a collector on two cores measure
how long the scheduler leaves a lock holder descheduled, not how long the
store makes others wait.
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
_CHURN_RATE = 100.0  # store+lease+read+drop cycles per second per churner
_SAMPLE_EVERY = 0.001  # seconds between two timed lease_by_content calls
_BLOB = 4096


def _churn(path: str, seconds: float, conn: Connection) -> None:
    """Child: store, lease by content, read, drop, ``_CHURN_RATE`` times a
    second for ``seconds``; send the number of cycles."""
    try:
        storage = directory_storage()(path)
        payload = os.urandom(_BLOB - 16)
        salt = os.urandom(8)
        conn.send("ready")
        conn.recv()  # start
        start = time.monotonic()
        deadline = start + seconds
        i = 0
        while (now := time.monotonic()) < deadline:
            due = start + i / _CHURN_RATE
            if now < due:
                time.sleep(due - now)
            i += 1
            lid = LeaseId.new()
            cid = storage.store_bytes(salt + i.to_bytes(8, "little") + payload, lid)
            other = LeaseId.new()
            storage.lease_by_content(cid, other)
            storage.get_data(cid, other)
            storage.advise_lease_dropped(other, cid)
            storage.advise_lease_dropped(lid, cid)
        storage.close()
        conn.send(("ok", [float(i)]))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _measure(path: str, seconds: float, conn: Connection) -> None:
    """Child: time ``lease_by_content`` of one held blob every
    ``_SAMPLE_EVERY`` seconds for ``seconds`` (each lease dropped after);
    send the times (seconds)."""
    try:
        storage = directory_storage()(path)
        holder = LeaseId.new()
        cid = storage.store_bytes(b"measured" + os.urandom(_BLOB - 8), holder)
        samples: list[float] = []
        clock = time.perf_counter
        conn.send("ready")
        conn.recv()  # start
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            lid = LeaseId.new()
            t0 = clock()
            storage.lease_by_content(cid, lid)
            samples.append(clock() - t0)
            storage.advise_lease_dropped(lid, cid)
            time.sleep(_SAMPLE_EVERY)
        storage.advise_lease_dropped(holder, cid)
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
) -> tuple[list[float], list[float], int]:
    """Start the measuring process, ``churners`` churning ones and (if
    ``collect``) a collector; let them work ``seconds``: (lease times,
    collect times, churn cycles done)."""
    mp = multiprocessing.get_context("fork")
    procs: list[Any] = []

    def start(target: Any, *args: Any) -> Connection:
        parent, child = mp.Pipe()
        proc = mp.Process(target=target, args=(path, *args, child))
        proc.start()
        child.close()
        procs.append(proc)
        return parent

    def result(conn: Connection, what: str, wait: float) -> list[float]:
        if not conn.poll(wait):
            raise RuntimeError(f"the {what} process did not finish")
        status, value = conn.recv()
        if status != "ok":
            raise RuntimeError(f"the {what} process failed: {value}")
        return list(value)

    try:
        measurer = start(_measure, seconds)
        pipes = [start(_churn, seconds) for _ in range(churners)]
        collector = start(_collector) if collect else None
        everyone = [measurer, *pipes, *([collector] if collector else [])]
        for conn in everyone:
            if not conn.poll(120) or conn.recv() != "ready":
                raise RuntimeError("a benchmark process did not start")
        for conn in everyone:
            conn.send("start")
        samples = result(measurer, "measuring", seconds + 600)
        cycles = sum(int(result(conn, "churning", 600)[0]) for conn in pipes)
        durations: list[float] = []
        if collector is not None:
            collector.send("stop")
            durations = result(collector, "collecting", 600)
        return samples, durations, cycles
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
        f"lease_by_content, {_CHURNERS} processes churning ({_CHURN_RATE:g}/s each) + "
        f"collect() every 1 s, {count_text(held)} blobs, DirectoryStorage"
    )
    baseline = "same on an idle store"
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
        idle, _, _ = _run(path, 0, idle_seconds, collect=False)
        busy, collects, cycles = _run(path, _CHURNERS, churn_seconds, collect=True)
    finally:
        remove_store(storage, path)
    for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
        rows[name].value = _quantile(busy, q) * 1e3
        rows[name].baseline_value = _quantile(idle, q) * 1e3
    median_collect = statistics.median(collects) * 1e3 if collects else float("nan")
    note = (
        f"{count_text(len(busy))} leases timed under churn, {count_text(len(idle))} idle; "
        f"{count_text(cycles)} churn cycles; "
        f"{len(collects)} collect() calls, median {median_collect:.0f} ms each"
    )
    for row in rows.values():
        row.note = note
