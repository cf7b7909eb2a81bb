"""Rows 12-16 (issue 13's rows 11-15): LeaseExecutor against ProcessPoolExecutor,
joblib and Ray on one machine, and BlobReader line iteration.

12  map over 32 float64 arrays of 8 MiB with 2 workers, a small result (a sum)
    and a big one (``a * 2`` returned); fresh arrays every repetition; every
    pool is started (warm) before the clock.
13  broadcast: one 256 MiB array passed to 16 tasks: time, and bytes written.
14  peak PSS summed over the caller and every process under it during the
    big-result map of row 12.
15  cold start: creating the executor plus its first result.
16  ``for line in reader`` over a 40 MB text blob vs io.BufferedReader.

Ray and joblib are in the ``bench`` extra; their rows say "not available"
without them.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from blobleases import LeaseExecutor

from .backends import remove_store, shm_store
from .harness import Context, MiB, Row, Target, interleave, no_gc, size_text

__all__ = ["executor_rows"]

WORKERS = 2


def total(a: Any) -> float:
    return float(a.sum())


def doubled(a: Any) -> Any:
    return a * 2


def one() -> int:
    return 1


def first_element(a: Any) -> float:
    return float(a[0])


def _plan(mode: str) -> dict[str, int]:
    if mode == "tiny":
        return {"n": 4, "size": 256 << 10, "reps": 1, "bcast": MiB, "tasks": 4, "text": MiB}
    if mode == "quick":
        return {
            "n": 32,
            "size": 8 * MiB,
            "reps": 3,
            "bcast": 256 * MiB,
            "tasks": 16,
            "text": 40_000_000,
        }
    return {
        "n": 32,
        "size": 8 * MiB,
        "reps": 5,
        "bcast": 256 * MiB,
        "tasks": 16,
        "text": 40_000_000,
    }


class _Fresh:
    """Distinct arrays every call (so no method gains from a cache)."""

    def __init__(self) -> None:
        self.counter = 0

    def arrays(self, n: int, size: int) -> list[Any]:
        out = []
        for _ in range(n):
            self.counter += 1
            out.append(np.full(size // 8, float(self.counter)))
        return out


def _joblib() -> Any:
    try:
        import joblib
    except ImportError:
        return None
    return joblib


def _ray(mode: str = "") -> Any:
    if mode == "tiny":
        return None  # (a ray.init takes seconds: tiny mode only checks the rows run)
    try:
        import ray  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    return ray


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    import psutil

    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return [pid]


@contextlib.contextmanager
def peak_pss() -> Iterator[list[int]]:
    """Samples the PSS summed over this process and every process under it
    (every 10 ms, in a thread) until the block ends; yields [peak]."""
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        pids = _tree(os.getpid())
        n = 0
        while not stop.is_set():
            if n % 10 == 0:
                pids = _tree(os.getpid())
            n += 1
            peak[0] = max(peak[0], sum(_pss(p) for p in pids))
            stop.wait(0.01)

    def once() -> None:
        peak[0] = max(peak[0], sum(_pss(p) for p in _tree(os.getpid())))

    once()  # (a run shorter than one sampling period is still measured)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
        once()
    finally:
        stop.set()
        thread.join()


def _stop_loky() -> None:
    """Stop joblib's reusable pool (its idle workers would otherwise live
    on for 300 s, and the row's process waits for them at exit)."""
    if _joblib() is not None:
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)


class _Peers:
    """The started pools: LeaseExecutor, ProcessPoolExecutor, joblib, Ray."""

    def __init__(self, ctx: Context) -> None:
        self.lease = LeaseExecutor(WORKERS)
        self.ppe = ProcessPoolExecutor(WORKERS)
        self.joblib = _joblib()
        self.ray = _ray(ctx.sizes.mode)
        self.ray_fns: dict[str, Any] = {}
        self.parallel: Any = None
        for pool in (self.lease, self.ppe):
            list(pool.map(int, range(WORKERS * 4)))
        if self.joblib is not None:
            self.parallel = self.joblib.Parallel(n_jobs=WORKERS)
            self.parallel(self.joblib.delayed(int)(i) for i in range(WORKERS * 4))
        if self.ray is not None:
            self.ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
            for fn in (total, doubled, first_element, one):
                self.ray_fns[fn.__name__] = self.ray.remote(fn)
            self.ray.get([self.ray_fns["one"].remote() for _ in range(WORKERS * 4)])

    def close(self) -> None:
        self.lease.shutdown()
        self.ppe.shutdown()
        _stop_loky()
        if self.ray is not None:
            self.ray.shutdown()

    def methods(self, fn: Callable[[Any], Any]) -> dict[str, Callable[[list[Any]], list[Any]]]:
        out: dict[str, Callable[[list[Any]], list[Any]]] = {
            "lease": lambda arrays: list(self.lease.map(fn, arrays)),
            "ppe": lambda arrays: list(self.ppe.map(fn, arrays)),
        }
        if self.joblib is not None:
            joblib = self.joblib
            out["joblib"] = lambda arrays: joblib.Parallel(n_jobs=WORKERS)(
                joblib.delayed(fn)(a) for a in arrays
            )
        if self.ray is not None:
            remote = self.ray_fns[fn.__name__]
            out["ray"] = lambda arrays: self.ray.get([remote.remote(a) for a in arrays])
        return out


PEERS = {
    "ppe": "ProcessPoolExecutor (pickles)",
    "joblib": "joblib (loky, auto-memmap)",
    "ray": "Ray (remote function)",
}
MISSING = {
    "joblib": "not available: joblib is not installed (pip install 'blobleases[bench]')",
    "ray": "not available: ray is not installed (pip install 'blobleases[bench]'), or tiny mode",
}


def _timed(
    run: Callable[[list[Any]], list[Any]], make: Callable[[], list[Any]]
) -> Callable[[], float]:
    def once() -> float:
        arrays = make()
        with no_gc():
            t0 = time.perf_counter()
            out = run(arrays)
            elapsed = time.perf_counter() - t0
        del out, arrays
        return elapsed

    return once


def _fill(
    rows: dict[str, Row], lease: float, peers: dict[str, float], have: dict[str, bool]
) -> None:
    for name, row in rows.items():
        if not have[name]:
            row.note = MISSING[name]
            continue
        row.value = lease
        row.baseline_value = peers[name]


def executor_rows(ctx: Context) -> None:
    plan = _plan(ctx.sizes.mode)
    n, size, reps = plan["n"], plan["size"], plan["reps"]
    what = f"map over {n} float64 arrays of {size_text(size)}, {WORKERS} workers, LeaseExecutor"
    targets = {"ppe": 3.0, "joblib": 1.5, "ray": 1.0}
    small: dict[str, Row] = {}
    big: dict[str, Row] = {}
    for letters, result, rows in (("abc", "small", small), ("def", "big", big)):
        for letter, name in zip(letters, PEERS, strict=True):
            rows[name] = ctx.row(
                f"12{letter} {what}, {result} result",
                "ms",
                PEERS[name],
                Target(">=", targets[name]),
                higher_is_better=False,
            )
    bsize = size_text(plan["bcast"])
    tasks = plan["tasks"]
    bcast = f"13{{}} broadcast one {bsize} array to {tasks} tasks, LeaseExecutor"
    b_time = {
        "ppe": ctx.row(bcast.format("a"), "ms", PEERS["ppe"], None, higher_is_better=False),
        "joblib": ctx.row(bcast.format("b"), "ms", PEERS["joblib"], None, higher_is_better=False),
        "ray": ctx.row(
            bcast.format("c"),
            "ms",
            "Ray (the array passed to each task)",
            None,
            higher_is_better=False,
        ),
    }
    b_bytes = ctx.row(
        bcast.format("d") + ", bytes written to the store",
        "MiB",
        f"{tasks} x pickled (ProcessPoolExecutor)",
        None,
        higher_is_better=False,
    )
    pss = "14{} peak PSS summed over all processes, row 12 big result, LeaseExecutor"
    p_rows = {
        name: ctx.row(
            pss.format(letter),
            "MiB",
            PEERS[name],
            Target(">=", 1.0, label="<= peer"),
            higher_is_better=False,
        )
        for letter, name in zip("abc", PEERS, strict=True)
    }
    cold = "15{} cold start: LeaseExecutor() + first result"
    c_ray = ctx.row(
        cold.format("a"),
        "ms",
        "ray.init() + first task",
        Target(">=", 10.0),
        higher_is_better=False,
    )
    c_joblib = ctx.row(
        cold.format("b"), "ms", "joblib Parallel, first call", None, higher_is_better=False
    )
    c_ppe = ctx.row(
        cold.format("c"), "ms", "ProcessPoolExecutor() + first result", None, higher_is_better=False
    )
    text = plan["text"]
    r_lines = ctx.row(
        f"16 line iteration over a {text / 1e6:g} MB text blob, BlobReader (shm://)",
        "ms",
        "io.BufferedReader over the same file",
        Target(">=", 0.5),
        higher_is_better=False,
    )

    _line_rows(ctx, r_lines, text)
    _cold_rows(c_ray, c_joblib, c_ppe, max(1, reps // 2), ctx.sizes.mode)

    fresh = _Fresh()
    peers = _Peers(ctx)
    have = {"ppe": True, "joblib": peers.joblib is not None, "ray": peers.ray is not None}
    try:
        for fn, rows in ((total, small), (doubled, big)):
            methods = peers.methods(fn)
            names = list(methods)
            results = interleave(
                reps, [_timed(methods[k], lambda: fresh.arrays(n, size)) for k in names]
            )
            ms = {k: ctx.summary(r) * 1000 for k, r in zip(names, results, strict=True)}
            _fill(rows, ms["lease"], ms, have)

        # 14: peak PSS of one big-result map per method (after the timing).
        methods = peers.methods(doubled)
        peak: dict[str, float] = {}
        for k, run in methods.items():
            arrays = fresh.arrays(n, size)
            with peak_pss() as got:
                out = run(arrays)
            del out, arrays
            peak[k] = got[0] / MiB
        _fill(p_rows, peak["lease"], peak, have)
        note = "PSS splits shared pages among the processes mapping them; sampled every 10 ms"
        for row in p_rows.values():
            row.note = row.note or note

        # 13: broadcast.
        array = fresh.arrays(1, plan["bcast"])[0]
        bmethods = peers.methods(first_element)
        bnames = list(bmethods)
        results = interleave(reps, [_timed(bmethods[k], lambda: [array] * tasks) for k in bnames])
        ms = {k: ctx.summary(r) * 1000 for k, r in zip(bnames, results, strict=True)}
        _fill(b_time, ms["lease"], ms, have)
        # bytes written in one more map, of a new array: stores minus dedup hits
        storage = peers.lease.storage
        array = fresh.arrays(1, plan["bcast"])[0]
        before = storage.stats().dedup_hits
        list(peers.lease.map(first_element, [array] * tasks))
        hits = storage.stats().dedup_hits - before
        b_bytes.value = (tasks - hits) * array.nbytes / MiB
        b_bytes.baseline_value = tasks * array.nbytes / MiB
        b_bytes.note = f"{hits} of {tasks} stores were dedup hits"
    finally:
        peers.close()


def _cold_rows(c_ray: Row, c_joblib: Row, c_ppe: Row, reps: int, mode: str) -> None:
    def lease() -> float:
        t0 = time.perf_counter()
        ex = LeaseExecutor(WORKERS)
        ex.submit(int, 1).result()
        elapsed = time.perf_counter() - t0
        ex.shutdown()
        return elapsed

    def ppe() -> float:
        t0 = time.perf_counter()
        ex = ProcessPoolExecutor(WORKERS)
        ex.submit(int, 1).result()
        elapsed = time.perf_counter() - t0
        ex.shutdown()
        return elapsed

    methods = [lease, ppe]
    joblib = _joblib()
    ray = _ray(mode)
    if joblib is not None:
        from joblib.externals.loky import get_reusable_executor

        def via_joblib() -> float:
            get_reusable_executor().shutdown(wait=True)  # a cold pool
            t0 = time.perf_counter()
            joblib.Parallel(n_jobs=WORKERS)(joblib.delayed(int)(1) for _ in range(1))
            return time.perf_counter() - t0

        methods.append(via_joblib)
    if ray is not None:

        def via_ray() -> float:
            t0 = time.perf_counter()
            ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
            ray.get(ray.remote(one).remote())
            elapsed = time.perf_counter() - t0
            ray.shutdown()
            return elapsed

        methods.append(via_ray)
    results = interleave(reps, methods, warmup=False)
    _stop_loky()
    ms = [statistics_median(r) * 1000 for r in results]
    c_ppe.value = ms[0]
    c_ppe.baseline_value = ms[1]
    if joblib is not None:
        c_joblib.value = ms[0]
        c_joblib.baseline_value = ms[2]
    else:
        c_joblib.note = MISSING["joblib"]
    if ray is not None:
        c_ray.value = ms[0]
        c_ray.baseline_value = ms[-1]
    else:
        c_ray.note = MISSING["ray"]


def statistics_median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def _line_rows(ctx: Context, row: Row, size: int) -> None:
    line = b"0.123456789 1.23456789 2.3456789 some words of text here\n"
    data = (line * (size // len(line) + 1))[:size]
    path = ctx.path("lines.txt")
    with open(path, "wb") as f:
        f.write(data)
    storage = shm_store(f"blobleases-bench-lines-{os.getpid()}")
    try:
        from blobleases import BlobManager

        lease = BlobManager(storage).store(data)

        def via_reader() -> float:
            with lease.get_reader() as reader, no_gc():
                t0 = time.perf_counter()
                for _ in reader:
                    pass
                return time.perf_counter() - t0

        def via_buffered() -> float:
            with io.BufferedReader(io.FileIO(path, "rb")) as f, no_gc():
                t0 = time.perf_counter()
                for _ in f:
                    pass
                return time.perf_counter() - t0

        reps = 3 if ctx.sizes.mode == "tiny" else 7
        got, base = interleave(reps, [via_reader, via_buffered])
        row.value = ctx.summary(got) * 1000
        row.baseline_value = ctx.summary(base) * 1000
        lease.close()
    finally:
        remove_store(storage)
        with contextlib.suppress(OSError):
            os.unlink(path)
