"""Rows 5, 6 and 10: hand big bytes from a parent to child processes that touch every page.

Children are forked once per row group and wait on a pipe, so process start-up
is not timed. A timed handoff starts with the bytes in the parent's hand and
ends when every child has replied that it touched every page (one byte per
4096, summed with numpy). Releasing (closing leases, readers and shared
memory, unlinking) happens after the clock stops, for every method alike.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import pickle
import time
from collections.abc import Callable
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import psutil

from blobleases import BlobManager, BlobStorage, LeaseId

from .backends import directory_storage, remove_store, shm_store
from .harness import Context, MiB, Row, Target, Unavailable, interleave, no_gc, size_text

__all__ = ["fanout_rows", "handoff_rows", "ray_rows"]

PAGE = 4096


def touch(buffer: Any) -> int:
    """Read one byte of every page (numpy over a strided view): forces every page in."""
    return int(np.frombuffer(buffer, dtype=np.uint8)[::PAGE].sum(dtype=np.uint64))


def _memory() -> tuple[int, int]:
    info = psutil.Process().memory_full_info()
    return int(info.rss), int(getattr(info, "pss", 0))


def _worker(conn: Connection) -> None:
    """A child: receive bytes one way or another, touch them, reply, hold until told."""
    held: dict[str, Any] = {}
    while True:
        msg = conn.recv()
        kind = msg[0]
        if kind == "stop":
            return
        try:
            if kind == "lease":
                held["lease"] = msg[1]  # unpickling the ticket leased the content here
                held["reader"] = held["lease"].get_reader()
                buf = held["reader"].getbuffer()
                total = touch(buf)
                del buf
            elif kind == "bytes":
                held["data"] = msg[1]
                total = touch(held["data"])
            elif kind == "shm":
                held["shm"] = SharedMemory(name=msg[1])
                total = touch(held["shm"].buf)
            else:
                raise ValueError(f"unknown message {kind!r}")
        except Exception as exc:
            held.clear()
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            continue
        finally:
            del msg
        conn.send(("done", total))
        while True:
            cmd = conn.recv()
            if cmd == "mem":
                conn.send(_memory())
            elif cmd == "release":
                try:
                    for key in ("reader", "lease", "shm"):
                        if key in held:
                            held.pop(key).close()
                    conn.send(("released", None))
                except Exception as exc:
                    conn.send(("error", f"{type(exc).__name__}: {exc}"))
                finally:
                    held.clear()
                break


class Workers:
    """``n`` forked children waiting on pipes."""

    def __init__(self, n: int) -> None:
        # Start the shared-memory resource tracker first so the children share
        # it (else each child starts its own and "cleans up" our segments).
        resource_tracker.ensure_running()
        mp = multiprocessing.get_context("fork")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(n):
            parent, child = mp.Pipe()
            proc = mp.Process(target=_worker, args=(child,), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def send(self, payload: bytes) -> None:
        for conn in self.conns:
            conn.send_bytes(payload)

    def wait(self, expected: int | None = None) -> None:
        for conn in self.conns:
            status, value = conn.recv()
            if status == "error":
                raise RuntimeError(f"child failed: {value}")
            if expected is not None and value != expected:
                raise RuntimeError(f"child read checksum {value}, expected {expected}")

    def memory(self) -> tuple[int, int]:
        """Sums of (RSS, PSS) of the children while they hold the bytes."""
        rss = pss = 0
        for conn in self.conns:
            conn.send("mem")
        for conn in self.conns:
            r, p = conn.recv()
            rss += r
            pss += p
        return rss, pss

    def release(self) -> None:
        for conn in self.conns:
            conn.send("release")
        self.wait()

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()


class Handoff:
    """The methods of handing ``size`` bytes to the workers; each returns seconds."""

    def __init__(self, workers: Workers, size: int) -> None:
        self.workers = workers
        self.size = size
        self._base = os.urandom(size)
        self._counter = itertools.count(1)
        self.memory: dict[str, list[tuple[int, int]]] = {}

    def fresh(self) -> bytes:
        """New content every time (so no store dedups against an earlier repetition)."""
        return next(self._counter).to_bytes(8, "little") + self._base[8:]

    def _finish(self, name: str, measure_memory: bool) -> None:
        if measure_memory:
            self.memory.setdefault(name, []).append(self.workers.memory())

    def blobleases(
        self, storage: BlobStorage, name: str, algorithm: str = "sha256", memory: bool = False
    ) -> Callable[[], float]:
        mgr = BlobManager(storage)

        def run() -> float:
            data = self.fresh()
            expected = touch(data)
            with no_gc():
                t0 = time.perf_counter()
                lease = mgr.store(data, algorithm=algorithm)
                ticket = lease.transfer()
                self.workers.send(pickle.dumps(("lease", ticket)))
                lease.close()
                self.workers.wait(expected)
                elapsed = time.perf_counter() - t0
            self._finish(name, memory)
            self.workers.release()
            # End the transfer lease now instead of letting it expire.
            storage.advise_lease_dropped(LeaseId.parse(ticket.transfer_lease_id), lease.content_id)
            return elapsed

        return run

    def pipe(self, memory: bool = False) -> Callable[[], float]:
        def run() -> float:
            data = self.fresh()
            expected = touch(data)
            with no_gc():
                t0 = time.perf_counter()
                # What Connection.send does, pickled once for all children.
                self.workers.send(pickle.dumps(("bytes", data)))
                self.workers.wait(expected)
                elapsed = time.perf_counter() - t0
            self._finish("pipe", memory)
            self.workers.release()
            return elapsed

        return run

    def shared_memory(self, memory: bool = False) -> Callable[[], float]:
        def run() -> float:
            data = self.fresh()
            expected = touch(data)
            with no_gc():
                t0 = time.perf_counter()
                shm = SharedMemory(create=True, size=len(data))
                buf = shm.buf
                assert buf is not None
                buf[: len(data)] = data
                del buf
                self.workers.send(pickle.dumps(("shm", shm.name)))
                self.workers.wait(expected)
                elapsed = time.perf_counter() - t0
            self._finish("shm", memory)
            self.workers.release()
            shm.close()
            shm.unlink()
            return elapsed

        return run


def _fs_type(path: str) -> str:
    """The file system type holding ``path`` (e.g. ext4, tmpfs)."""
    path = os.path.realpath(path)
    best, fstype = "", "unknown"
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint
        if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best, fstype = mount, part.fstype
    return fstype


def handoff_rows(ctx: Context) -> None:
    s = ctx.sizes
    size = size_text(s.handoff)
    what = f"5{{}} handoff {size} to 1 child"
    ms = "ms"
    pipe = "mp pipe, pickled bytes"
    shmem = "mp shared_memory"
    r_pipe = ctx.row(
        what.format("a") + ", shm:// store", ms, pipe, Target(">=", 3.0), higher_is_better=False
    )
    r_shm = ctx.row(
        what.format("b") + ", shm:// store", ms, shmem, Target(">=", 1.0), higher_is_better=False
    )
    disk_dir = ctx.path("handoff-disk")
    r_disk = ctx.row(
        what.format("c") + f", disk store ({_fs_type(ctx.workdir)})",
        ms,
        shmem,
        None,
        higher_is_better=False,
    )
    r_b3 = ctx.row(
        what.format("d") + ", shm:// store, blake3",
        ms,
        shmem,
        None,
        higher_is_better=False,
    )
    ds = directory_storage()
    shm = disk = None
    workers = Workers(1)
    try:
        shm = shm_store(f"blobleases-bench-{os.getpid()}")
        disk = ds(disk_dir)
        h = Handoff(workers, s.handoff)
        methods = [
            h.blobleases(shm, "shm"),
            h.pipe(),
            h.shared_memory(),
            h.blobleases(disk, "disk"),
        ]
        blake3_note = ""
        try:
            import blake3  # noqa: F401

            methods.append(h.blobleases(shm, "blake3", algorithm="blake3"))
        except ImportError:
            blake3_note = "not available: blake3 is not installed (pip install blobleases[blake3])"
        results = interleave(s.handoff_reps, methods)
        bl, p, sm, dk = (ctx.summary(x) * 1000 for x in results[:4])
        r_pipe.value = r_shm.value = bl
        r_pipe.baseline_value = p
        r_shm.baseline_value = r_disk.baseline_value = r_b3.baseline_value = sm
        r_disk.value = dk
        if len(results) > 4:
            r_b3.value = ctx.summary(results[4]) * 1000
        else:
            r_b3.note = blake3_note
    finally:
        workers.close()
        remove_store(shm)
        remove_store(disk, disk_dir)


def fanout_rows(ctx: Context) -> None:
    s = ctx.sizes
    n = s.fanout_children
    size = size_text(s.handoff)
    what = f"6{{}} fan-out {size} to {n} children, shm:// store"
    pipe = "mp pipe, pickled once"
    shmem = "mp shared_memory"
    r_pipe = ctx.row(what.format("a"), "ms", pipe, Target(">=", 4.0), higher_is_better=False)
    r_shm = ctx.row(what.format("b"), "ms", shmem, Target(">=", 1.0), higher_is_better=False)
    mem = f"6{{}} fan-out {size} to {n} children, RSS sum, shm:// store"
    r_rss_pipe = ctx.row(mem.format("c"), "MiB", pipe, None, higher_is_better=False)
    r_rss_shm = ctx.row(mem.format("d"), "MiB", shmem, None, higher_is_better=False)
    pss = f"6{{}} fan-out {size} to {n} children, PSS sum, shm:// store"
    r_pss_pipe = ctx.row(pss.format("e"), "MiB", pipe, None, higher_is_better=False)
    r_pss_shm = ctx.row(pss.format("f"), "MiB", shmem, None, higher_is_better=False)
    directory_storage()
    store = None
    workers = Workers(n)
    try:
        store = shm_store(f"blobleases-bench-fanout-{os.getpid()}")
        h = Handoff(workers, s.handoff)
        results = interleave(
            s.handoff_reps,
            [h.blobleases(store, "blobleases", memory=True), h.pipe(True), h.shared_memory(True)],
        )
        bl, p, sm = (ctx.summary(x) * 1000 for x in results)
        r_pipe.value = r_shm.value = bl
        r_pipe.baseline_value = p
        r_shm.baseline_value = sm

        def med(name: str, idx: int) -> float:
            values = sorted(m[idx] for m in h.memory[name])
            return values[len(values) // 2] / MiB

        r_rss_pipe.value = r_rss_shm.value = med("blobleases", 0)
        r_rss_pipe.baseline_value = med("pipe", 0)
        r_rss_shm.baseline_value = med("shm", 0)
        r_pss_pipe.value = r_pss_shm.value = med("blobleases", 1)
        r_pss_pipe.baseline_value = med("pipe", 1)
        r_pss_shm.baseline_value = med("shm", 1)
        note = "RSS counts every shared page a child touched; PSS splits shared pages among the processes mapping them"
        r_rss_pipe.note = r_rss_shm.note = r_pss_pipe.note = r_pss_shm.note = note
    finally:
        workers.close()
        remove_store(store)


def ray_rows(ctx: Context) -> None:
    s = ctx.sizes
    size = size_text(s.handoff)
    row: Row = ctx.row(
        f"10 handoff {size} to 1 child, shm:// store (optional)",
        "ms",
        "ray.put + task ray.get",
        None,
        higher_is_better=False,
    )
    try:
        import ray  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise Unavailable("ray is not installed (optional row)") from exc
    directory_storage()
    store = None
    workers = Workers(1)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        store = shm_store(f"blobleases-bench-ray-{os.getpid()}")
        h = Handoff(workers, s.handoff)

        @ray.remote  # type: ignore[misc, untyped-decorator, unused-ignore]
        def ray_touch(array: Any) -> int:
            return touch(array)

        def via_ray() -> float:
            data = np.frombuffer(h.fresh(), dtype=np.uint8)
            with no_gc():
                t0 = time.perf_counter()
                ref = ray.put(data)
                ray.get(ray_touch.remote(ref))
                elapsed = time.perf_counter() - t0
            del ref
            return elapsed

        bl, rr = interleave(s.handoff_reps, [h.blobleases(store, "blobleases"), via_ray])
        row.value = ctx.summary(bl) * 1000
        row.baseline_value = ctx.summary(rr) * 1000
    finally:
        ray.shutdown()
        workers.close()
        remove_store(store)
