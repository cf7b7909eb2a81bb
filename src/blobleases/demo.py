"""``blobleases demo``: the whole system at work, with its invariants checked.

A producer stores blobs (a quarter of them twice, so dedup hits are real)
and hands their content ids to worker processes. Each worker leases its blobs
by content id, verifies their hashes and keeps re-reading them. The producer
then drops its own leases, so every blob is held only by workers, and some
only by worker 0. Worker 0 is SIGKILLed mid-work; the run watches its leases
get reaped and calls ``collect()``, checks that the content only it held is
gone and that everything else is intact, and has the survivors re-read and
verify every lease they hold. It ends with a table and a verdict per
invariant.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, cast

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .content_id import ContentId
from .errors import BlobLeaseError
from .lease import BlobLease
from .manager import BlobManager
from .reports import CollectReport
from .storage import BlobStorage
from .urls import open_storage

__all__ = ["DemoConfig", "DemoResult", "Invariant", "run_demo"]

#: Policies of every handle on the demo store: reap dead processes quickly.
DEMO_POLICIES: dict[str, Any] = {"reap_interval": 0.5}
#: Seconds the workers keep re-reading before the victim is killed.
WORK_SECONDS = 1.0
#: Upper bound for any one wait (a worker that never answers fails the run).
WAIT_TIMEOUT = 60.0

# Shared counters per worker (a lock-free array: a SIGKILLed worker can
# never leave a lock held): reads verified, bytes verified, failures.
_READS, _BYTES, _FAILS, _NCOUNTERS = 0, 1, 2, 3


@dataclass(frozen=True)
class DemoConfig:
    workers: int = 4
    blobs: int = 48
    size: int = 1 << 20
    store: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 2:
            raise ValueError(f"workers must be at least 2, not {self.workers}")
        if self.blobs < 2 * self.workers:
            raise ValueError(
                f"blobs ({self.blobs}) must be at least twice workers ({self.workers})"
            )
        if self.size < 1:
            raise ValueError(f"size must be at least 1 byte, not {self.size}")

    @property
    def duplicates(self) -> int:
        return max(1, self.blobs // 4)

    @property
    def unique(self) -> int:
        return self.blobs - self.duplicates


@dataclass
class Invariant:
    name: str
    ok: bool
    detail: str


@dataclass
class DemoResult:
    store: str
    workers: int
    blobs: int
    unique_blobs: int
    bytes: int
    dedup_hits: int
    verified_reads: int
    verified_bytes: int
    throughput_mb_s: float
    victim_pid: int
    victim_leases: int
    victim_only_blobs: int
    leases_reaped: int
    bytes_freed: int
    reaped_before_collect: bool
    collect: dict[str, int]
    seconds: float
    invariants: list[Invariant] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.invariants) and all(inv.ok for inv in self.invariants)

    @property
    def failed(self) -> list[Invariant]:
        return [inv for inv in self.invariants if not inv.ok]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        data["failed"] = [inv.name for inv in self.failed]
        return data


# ---------------------------------------------------------------------------
# the worker process


def _worker_main(
    index: int,
    url: str,
    policies: dict[str, Any],
    cids: list[str],
    counters: Any,
    stop: Any,
    conn: Connection,
) -> None:
    """Lease ``cids`` by content id, verify them, report ready, then re-read
    and verify them until ``stop`` is set, do one last full pass and report."""
    base = index * _NCOUNTERS
    failures: list[str] = []
    leases: list[BlobLease] = []
    storage: BlobStorage | None = None

    def one_pass() -> int:
        ok = 0
        for lease in leases:
            try:
                data = lease.get_data()
                if ContentId.for_bytes(data, lease.content_id.algorithm) != lease.content_id:
                    raise BlobLeaseError(f"bytes of {lease.content_id} fail their hash")
            except BlobLeaseError as exc:
                counters[base + _FAILS] += 1
                if len(failures) < 10:
                    failures.append(f"{lease.content_id}: {type(exc).__name__}: {exc}")
                continue
            counters[base + _READS] += 1
            counters[base + _BYTES] += len(data)
            ok += 1
        return ok

    try:
        storage = open_storage(url, **policies)
        manager = BlobManager(storage)
        for text in cids:
            leases.append(manager.get_by_content_id(text))
        one_pass()
        conn.send(("ready", os.getpid(), len(leases)))
        while not stop.value:
            one_pass()
        final_ok = one_pass()  # every lease, read after the reap and collect
        conn.send(("done", final_ok, len(leases), failures))
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    finally:
        for lease in leases:
            with contextlib.suppress(BlobLeaseError):
                lease.close()
        if storage is not None:
            storage.close()
        conn.close()


# ---------------------------------------------------------------------------
# the producer and the run


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection
    role: str
    pid: int = 0
    leases: int = 0
    status: str = "starting"
    final_ok: int = 0
    failures: list[str] = field(default_factory=list)


def _assign(unique: int, workers: int) -> list[list[int]]:
    """Which blobs each worker leases. Blob i goes to worker i % workers;
    every other round of blobs also goes to the next worker, so some blobs are
    shared and some, worker 0's first among them, are held by one worker."""
    holders: list[list[int]] = [[] for _ in range(unique)]
    for i in range(unique):
        primary = i % workers
        holders[i].append(primary)
        if (i // workers) % 2 == 1:
            holders[i].append((primary + 1) % workers)
    return holders


class _Display:
    """The live view: a log of steps above a table of the workers."""

    def __init__(self, console: Console | None, workers: list[_Worker], counters: Any) -> None:
        self.console = console
        self.workers = workers
        self.counters = counters
        self.status = ""
        self.live: Live | None = None

    def __enter__(self) -> _Display:
        if self.console is not None:
            self.live = Live(
                get_renderable=self.render,
                console=self.console,
                refresh_per_second=10,
                transient=False,
            )
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.status = ""
        if self.live is not None:
            self.live.stop()
            if not self.live.console.is_terminal:
                self.live.console.line()  # the final frame ends without a newline

    def log(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, highlight=False)

    def render(self) -> RenderableType:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("worker", justify="right")
        table.add_column("pid", justify="right")
        table.add_column("role")
        table.add_column("leases", justify="right")
        table.add_column("reads", justify="right")
        table.add_column("MB read", justify="right")
        table.add_column("bad", justify="right")
        table.add_column("status")
        for w in self.workers:
            base = w.index * _NCOUNTERS
            fails = int(self.counters[base + _FAILS])
            table.add_row(
                str(w.index),
                str(w.pid or ""),
                w.role,
                str(w.leases),
                str(int(self.counters[base + _READS])),
                f"{self.counters[base + _BYTES] / 1e6:.1f}",
                Text(str(fails), style="red" if fails else ""),
                w.status,
            )
        parts: list[RenderableType] = [table]
        if self.status:
            parts.append(Text(self.status, style="yellow"))
        return Group(*parts)


def _open_store(config: DemoConfig) -> tuple[BlobStorage, bool]:
    if config.store is None:
        from .directory import DirectoryStorage

        return DirectoryStorage.temporary(**DEMO_POLICIES), True
    return open_storage(config.store, **DEMO_POLICIES), False


def run_demo(config: DemoConfig, console: Console | None = None) -> DemoResult:
    """Run the demo; show it live on ``console`` (None: silently)."""
    t0 = time.perf_counter()
    storage, temporary = _open_store(config)
    if not storage.shareable:
        storage.close()
        raise ValueError(f"the demo needs a store that other processes can open, not {storage.url}")
    ctx = multiprocessing.get_context("spawn")
    counters = ctx.RawArray("q", config.workers * _NCOUNTERS)
    stop = ctx.RawValue("b", 0)
    workers: list[_Worker] = []
    try:
        return _run(config, console, storage, temporary, ctx, counters, stop, workers, t0)
    finally:
        stop.value = 1
        for w in workers:
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.conn.close()
        storage.close()


def _run(
    config: DemoConfig,
    console: Console | None,
    storage: BlobStorage,
    temporary: bool,
    ctx: Any,
    counters: Any,
    stop: Any,
    workers: list[_Worker],
    t0: float,
) -> DemoResult:
    invariants: list[Invariant] = []

    def check(name: str, ok: bool, detail: str) -> bool:
        invariants.append(Invariant(name, ok, detail))
        if display is not None and not ok:
            display.log(f"[bold red]✗ invariant failed:[/] {name}: {detail}")
        return ok

    display: _Display | None = None
    unique, size = config.unique, config.size
    where = "a temporary directory store" if temporary else storage.url
    if console is not None:
        console.print(
            f"[bold]blobleases demo[/]: {config.workers} workers, {config.blobs} blobs of "
            f"{_size_text(size)}, on {where}",
            highlight=False,
        )

    # 1. The producer stores the blobs, some twice (dedup hits).
    manager = BlobManager(storage)
    dedup_before = storage.stats().dedup_hits
    producer: list[BlobLease] = []
    cids: list[ContentId] = []
    t_store = time.perf_counter()
    for i in range(unique):
        data = os.urandom(size)
        lease = manager.store(data)
        producer.append(lease)
        cids.append(lease.content_id)
        if i < config.duplicates:
            producer.append(manager.store(bytes(bytearray(data))))  # same bytes, new object
    store_seconds = time.perf_counter() - t_store
    dedup_hits = storage.stats().dedup_hits - dedup_before
    stored_bytes = unique * size

    # 2. Workers lease the blobs by content id (spawned processes that open the
    #    store by its url: nothing but content ids crosses to them).
    holders = _assign(unique, config.workers)
    child_ends: list[Connection] = []
    for index in range(config.workers):
        mine = [cids[i] for i in range(unique) if index in holders[i]]
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_worker_main,
            args=(
                index,
                storage.url,
                DEMO_POLICIES,
                [str(c) for c in mine],
                counters,
                stop,
                child_conn,
            ),
            name=f"blobleases-demo-worker-{index}",
            daemon=True,
        )
        workers.append(_Worker(index, process, parent_conn, "victim" if index == 0 else "survivor"))
        child_ends.append(child_conn)
    t_work = time.perf_counter()
    for w in workers:
        w.process.start()
    # Close our copies of the children's ends so a dead child reads as EOF.
    for end in child_ends:
        end.close()
    display = _Display(console, workers, counters)
    with display:
        display.log(
            f"[green]✓[/] producer stored {config.blobs} blobs: {unique} unique, "
            f"{dedup_hits} dedup hits ({stored_bytes / 1e6:.1f} MB in {store_seconds:.2f} s)"
        )
        display.status = "starting workers…"
        ready_ok = _await_ready(workers)
        if not check("workers lease blobs by content id", ready_ok, _worker_errors(workers)):
            return _result(config, storage, workers, counters, invariants, t0, t_work, dedup_hits)
        total_leases = sum(w.leases for w in workers)
        display.log(
            f"[green]✓[/] {config.workers} worker processes took {total_leases} leases by "
            "content id; hashes verified"
        )

        # 3. The producer lets go: every blob is now held only by workers.
        for lease in producer:
            lease.close()
        producer.clear()
        victim = workers[0]
        victim_only = [cids[i] for i in range(unique) if holders[i] == [0]]
        shared_with_victim = [
            cids[i] for i in range(unique) if 0 in holders[i] and len(holders[i]) > 1
        ]
        display.log(
            f"[green]✓[/] producer dropped its leases: {len(victim_only)} blobs are now "
            "held by worker 0 alone"
        )

        # 4. Work: everyone re-reads and verifies; then SIGKILL the victim.
        display.status = "workers re-reading and verifying their leases…"
        base_reads = [counters[w.index * _NCOUNTERS + _READS] for w in workers]
        deadline = time.monotonic() + WAIT_TIMEOUT
        t_min = time.monotonic() + WORK_SECONDS
        while time.monotonic() < deadline:
            done = all(
                counters[w.index * _NCOUNTERS + _READS] >= base_reads[w.index] + w.leases
                for w in workers
            )
            if done and time.monotonic() >= t_min:
                break
            time.sleep(0.05)
        victim_held = [h for h in storage.iter_leases() if h.pid == victim.pid]
        present_before = all(storage.contains(c) for c in victim_only)
        check(
            "the victim holds content no one else holds",
            bool(victim_held) and bool(victim_only) and present_before,
            f"{len(victim_held)} leases, {len(victim_only)} blobs only it holds",
        )
        victim.process.kill()  # SIGKILL: no cleanup code runs in the victim
        victim.process.join(timeout=WAIT_TIMEOUT)
        victim.status = "[bold red]SIGKILLed[/]"
        t_kill = time.monotonic()
        display.log(
            f"[bold red]☠[/] SIGKILL worker 0 (pid {victim.pid}) mid-work: "
            f"{len(victim_held)} leases, {len(victim_only)} blobs only it holds"
        )

        # 5. Watch the live processes reap its leases, then collect().
        reap_wait = 2 * float(DEMO_POLICIES["reap_interval"]) + 1.0
        remaining = len(victim_held)
        while time.monotonic() - t_kill < reap_wait and remaining:
            remaining = sum(1 for h in storage.iter_leases() if h.pid == victim.pid)
            display.status = (
                f"leases of dead pid {victim.pid}: {remaining} left "
                f"({time.monotonic() - t_kill:.1f} s after the kill)"
            )
            if remaining:
                time.sleep(0.05)
        reaped_before_collect = remaining == 0 and bool(victim_held)
        if reaped_before_collect:
            display.log(
                f"[green]✓[/] its {len(victim_held)} leases were reaped by the live workers "
                f"{time.monotonic() - t_kill:.2f} s after the kill"
            )
        report = storage.collect()
        left = [h for h in storage.iter_leases() if h.pid == victim.pid]
        leases_reaped = len(victim_held) - len(left)
        gone = [c for c in victim_only if not storage.contains(c)]
        bytes_freed = len(gone) * size
        mark = "[green]✓[/]" if not left and len(gone) == len(victim_only) else "[red]✗[/]"
        display.log(
            f"{mark} collect(): {len(left)} of its leases left; {len(gone)} of the "
            f"{len(victim_only)} blobs only it held freed ({bytes_freed / 1e6:.1f} MB)"
        )
        check(
            "the killed worker's leases are reaped",
            bool(victim_held) and not left,
            f"{leases_reaped} of {len(victim_held)} reaped",
        )
        check(
            "content only it held is collected",
            len(gone) == len(victim_only) and bytes_freed > 0,
            f"{len(gone)} of {len(victim_only)} blobs gone, {bytes_freed} bytes freed",
        )
        kept = [c for c in shared_with_victim if storage.contains(c)]
        check(
            "content it shared is kept",
            len(kept) == len(shared_with_victim),
            f"{len(kept)} of {len(shared_with_victim)} shared blobs present",
        )

        # 6. Survivors re-read every lease after the reap, then stop.
        display.status = "survivors re-reading every lease after the reap…"
        stop.value = 1
        survivors = workers[1:]
        finished = _await_done(survivors)
        reads_after = sum(w.final_ok for w in survivors)
        leases_after = sum(w.leases for w in survivors)
        fails = sum(int(counters[w.index * _NCOUNTERS + _FAILS]) for w in survivors)
        check(
            "every other lease reads verified bytes",
            finished and fails == 0 and reads_after == leases_after,
            f"{reads_after} of {leases_after} leases verified after the reap, "
            f"{fails} failed reads" + (f": {_failures_text(survivors)}" if fails else ""),
        )
        if finished and fails == 0:
            display.log(
                f"[green]✓[/] {len(survivors)} survivors re-read their {leases_after} leases "
                "after the reap: all bytes verified"
            )
        for w in survivors:
            w.process.join(timeout=WAIT_TIMEOUT)
            w.status = "done" if w.process.exitcode == 0 else f"exit {w.process.exitcode}"
        check(
            "survivors exit cleanly",
            all(w.process.exitcode == 0 for w in survivors),
            ", ".join(f"worker {w.index}: exit {w.process.exitcode}" for w in survivors),
        )
        t_end_work = time.perf_counter()

        # 7. Nothing leaked, nothing broken.
        display.status = "checking for leaks and verifying the store…"
        storage.collect()
        leaked = [c for c in cids if storage.contains(c)]
        check(
            "nothing leaks",
            not leaked,
            f"{len(leaked)} of {unique} blobs still present",
        )
        if temporary:
            st = storage.stats()
            check(
                "the store ends empty",
                st.blobs == 0 and st.leases == 0,
                f"{st.blobs} blobs, {st.leases} leases",
            )
        check(
            "duplicates are dedup hits",
            dedup_hits >= config.duplicates,
            f"{dedup_hits} dedup hits for {config.duplicates} duplicates",
        )
        vreport = storage.verify()
        check(
            "verify() is clean",
            not vreport,
            f"{len(vreport.corrupted)} corrupted, {len(vreport.missing)} missing, "
            f"{len(vreport.orphaned)} orphaned",
        )
        if not leaked and not vreport:
            display.log("[green]✓[/] nothing leaked; verify() is clean")

    result = _result(
        config,
        storage,
        workers,
        counters,
        invariants,
        t0,
        t_work,
        dedup_hits,
        victim_leases=len(victim_held),
        victim_only=len(victim_only),
        leases_reaped=leases_reaped,
        bytes_freed=bytes_freed,
        reaped_before_collect=reaped_before_collect,
        collect=report,
        t_end_work=t_end_work,
    )
    if console is not None:
        _print_summary(console, result)
    return result


def _failures_text(survivors: list[_Worker]) -> str:
    return "; ".join(f for w in survivors for f in w.failures[:3])


def _worker_errors(workers: list[_Worker]) -> str:
    bad = [f"worker {w.index}: {w.status}" for w in workers if w.status not in ("working", "done")]
    return "; ".join(bad) or "all ready"


def _await_replies(
    workers: list[_Worker],
    expected: str,
    accept: Callable[[_Worker, tuple[Any, ...]], None],
    died: str,
    late: str,
) -> None:
    """Collect one reply from each worker: ``accept`` a reply of the
    ``expected`` kind, else mark the worker failed, died or late."""
    pending = {w.conn: w for w in workers}
    deadline = time.monotonic() + WAIT_TIMEOUT
    while pending and time.monotonic() < deadline:
        for ready in wait(list(pending), timeout=0.2):
            conn = cast(Connection, ready)
            w = pending.pop(conn)
            try:
                msg = conn.recv()
            except EOFError:
                w.status = died
                continue
            if msg[0] == expected:
                accept(w, msg)
            else:
                w.status = f"failed: {msg[1]}"
    for w in pending.values():
        w.status = late


def _await_ready(workers: list[_Worker]) -> bool:
    def accept(w: _Worker, msg: tuple[Any, ...]) -> None:
        w.pid, w.leases, w.status = msg[1], msg[2], "working"

    _await_replies(workers, "ready", accept, "died before it was ready", "not ready in time")
    return all(w.status == "working" for w in workers)


def _await_done(workers: list[_Worker]) -> bool:
    def accept(w: _Worker, msg: tuple[Any, ...]) -> None:
        w.final_ok, w.failures, w.status = msg[1], msg[3], "finishing"

    _await_replies(workers, "done", accept, "died", "no answer in time")
    return all(w.status == "finishing" for w in workers)


def _result(
    config: DemoConfig,
    storage: BlobStorage,
    workers: list[_Worker],
    counters: Any,
    invariants: list[Invariant],
    t0: float,
    t_work: float,
    dedup_hits: int,
    *,
    victim_leases: int = 0,
    victim_only: int = 0,
    leases_reaped: int = 0,
    bytes_freed: int = 0,
    reaped_before_collect: bool = False,
    collect: CollectReport | None = None,
    t_end_work: float | None = None,
) -> DemoResult:
    now = time.perf_counter()
    reads = sum(int(counters[w.index * _NCOUNTERS + _READS]) for w in workers)
    nbytes = sum(int(counters[w.index * _NCOUNTERS + _BYTES]) for w in workers)
    work_seconds = max((t_end_work or now) - t_work, 1e-9)
    return DemoResult(
        store="temp://" if config.store is None else storage.url,
        workers=config.workers,
        blobs=config.blobs,
        unique_blobs=config.unique,
        bytes=config.unique * config.size,
        dedup_hits=dedup_hits,
        verified_reads=reads,
        verified_bytes=nbytes,
        throughput_mb_s=round(nbytes / 1e6 / work_seconds, 1),
        victim_pid=workers[0].pid if workers else 0,
        victim_leases=victim_leases,
        victim_only_blobs=victim_only,
        leases_reaped=leases_reaped,
        bytes_freed=bytes_freed,
        reaped_before_collect=reaped_before_collect,
        collect=asdict(collect if collect is not None else CollectReport()),
        seconds=round(now - t0, 2),
        invariants=invariants,
    )


def _size_text(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % (scale // 1024 or 1) == 0:
            return f"{n / scale:g} {unit}"
    return f"{n} bytes"


def _print_summary(console: Console, result: DemoResult) -> None:
    held = len([inv for inv in result.invariants if inv.ok])
    verdict = (
        f"[bold green]all {held} invariants hold[/]"
        if result.ok
        else f"[bold red]{len(result.failed)} of {len(result.invariants)} invariants failed[/]"
    )
    table = Table(box=box.ROUNDED, show_header=False, title="blobleases demo", title_style="bold")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("blobs", f"{result.blobs} ({result.unique_blobs} unique)")
    table.add_row("bytes", f"{result.bytes / 1e6:.1f} MB")
    table.add_row("dedup hits", str(result.dedup_hits))
    table.add_row("throughput", f"{result.throughput_mb_s:.0f} MB/s verified reads")
    table.add_row("leases reaped", f"{result.leases_reaped} of {result.victim_leases}")
    table.add_row("bytes freed", f"{result.bytes_freed / 1e6:.1f} MB")
    table.add_row("seconds", f"{result.seconds:.1f}")
    console.print(table)
    for inv in result.invariants:
        if inv.ok:
            console.print(f"[green]✓[/] {inv.name}", highlight=False)
        else:
            console.print(f"[bold red]✗ {inv.name}[/]: {inv.detail}", highlight=False)
    console.print(verdict)
