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
from .reports import CollectReport, LeaseInfo
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
        return _run(_Run(config, console, storage, temporary, ctx, counters, stop, workers, t0))
    finally:
        stop.value = 1
        for w in workers:
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.conn.close()
        storage.close()


@dataclass
class _Run:
    """One demo run: the state its phases share, and the invariants they check."""

    config: DemoConfig
    console: Console | None
    storage: BlobStorage
    temporary: bool
    ctx: Any
    counters: Any
    stop: Any
    workers: list[_Worker]
    t0: float
    display: _Display | None = None
    invariants: list[Invariant] = field(default_factory=list)
    producer: list[BlobLease] = field(default_factory=list)
    cids: list[ContentId] = field(default_factory=list)
    holders: list[list[int]] = field(default_factory=list)
    dedup_hits: int = 0
    t_work: float = 0.0
    victim_held: list[LeaseInfo] = field(default_factory=list)
    victim_only: list[ContentId] = field(default_factory=list)
    leases_reaped: int = 0
    bytes_freed: int = 0
    reaped_before_collect: bool = False
    report: CollectReport | None = None
    t_end_work: float | None = None

    @property
    def log(self) -> _Display:
        assert self.display is not None
        return self.display

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.invariants.append(Invariant(name, ok, detail))
        if self.display is not None and not ok:
            self.display.log(f"[bold red]✗ invariant failed:[/] {name}: {detail}")
        return ok

    def announce(self) -> None:
        where = "a temporary directory store" if self.temporary else self.storage.url
        if self.console is not None:
            self.console.print(
                f"[bold]blobleases demo[/]: {self.config.workers} workers, {self.config.blobs} "
                f"blobs of {_size_text(self.config.size)}, on {where}",
                highlight=False,
            )

    def store_with_dedup_hits(self) -> str:
        """1. The producer stores the blobs, some twice (dedup hits); the line
        that says so, shown once the live view is up."""
        manager = BlobManager(self.storage)
        dedup_before = self.storage.stats().dedup_hits
        t_store = time.perf_counter()
        for i in range(self.config.unique):
            data = os.urandom(self.config.size)
            lease = manager.store(data)
            self.producer.append(lease)
            self.cids.append(lease.content_id)
            if i < self.config.duplicates:
                self.producer.append(manager.store(bytes(bytearray(data))))  # a new object
        store_seconds = time.perf_counter() - t_store
        self.dedup_hits = self.storage.stats().dedup_hits - dedup_before
        stored_bytes = self.config.unique * self.config.size
        return (
            f"[green]✓[/] producer stored {self.config.blobs} blobs: {self.config.unique} "
            f"unique, {self.dedup_hits} dedup hits ({stored_bytes / 1e6:.1f} MB in "
            f"{store_seconds:.2f} s)"
        )

    def spawn_workers(self) -> None:
        """2. Workers that lease the blobs by content id: spawned processes
        that open the store by its url (nothing but content ids crosses)."""
        unique = self.config.unique
        self.holders = _assign(unique, self.config.workers)
        child_ends: list[Connection] = []
        for index in range(self.config.workers):
            mine = [self.cids[i] for i in range(unique) if index in self.holders[i]]
            parent_conn, child_conn = self.ctx.Pipe(duplex=False)
            process = self.ctx.Process(
                target=_worker_main,
                args=(
                    index,
                    self.storage.url,
                    DEMO_POLICIES,
                    [str(c) for c in mine],
                    self.counters,
                    self.stop,
                    child_conn,
                ),
                name=f"blobleases-demo-worker-{index}",
                daemon=True,
            )
            role = "victim" if index == 0 else "survivor"
            self.workers.append(_Worker(index, process, parent_conn, role))
            child_ends.append(child_conn)
        self.t_work = time.perf_counter()
        for w in self.workers:
            w.process.start()
        # Close our copies of the children's ends so a dead child reads as EOF.
        for end in child_ends:
            end.close()

    def workers_lease_by_content_id(self) -> bool:
        self.log.status = "starting workers…"
        ready_ok = _await_ready(self.workers)
        if not self.check(
            "workers lease blobs by content id", ready_ok, _worker_errors(self.workers)
        ):
            return False
        total_leases = sum(w.leases for w in self.workers)
        self.log.log(
            f"[green]✓[/] {self.config.workers} worker processes took {total_leases} leases by "
            "content id; hashes verified"
        )
        return True

    def producer_lets_go(self) -> list[ContentId]:
        """3. Every blob is now held only by workers; the blobs the victim
        shares with another worker."""
        for lease in self.producer:
            lease.close()
        self.producer.clear()
        unique, holders = self.config.unique, self.holders
        self.victim_only = [self.cids[i] for i in range(unique) if holders[i] == [0]]
        shared = [self.cids[i] for i in range(unique) if 0 in holders[i] and len(holders[i]) > 1]
        self.log.log(
            f"[green]✓[/] producer dropped its leases: {len(self.victim_only)} blobs are now "
            "held by worker 0 alone"
        )
        return shared

    def sigkill_the_victim_mid_work(self) -> float:
        """4. Everyone re-reads and verifies; then SIGKILL worker 0. When it died."""
        self.log.status = "workers re-reading and verifying their leases…"
        counters, workers, victim = self.counters, self.workers, self.workers[0]
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
        self.victim_held = [h for h in self.storage.iter_leases() if h.pid == victim.pid]
        present_before = all(self.storage.contains(c) for c in self.victim_only)
        self.check(
            "the victim holds content no one else holds",
            bool(self.victim_held) and bool(self.victim_only) and present_before,
            f"{len(self.victim_held)} leases, {len(self.victim_only)} blobs only it holds",
        )
        victim.process.kill()  # SIGKILL: no cleanup code runs in the victim
        victim.process.join(timeout=WAIT_TIMEOUT)
        victim.status = "[bold red]SIGKILLed[/]"
        t_kill = time.monotonic()
        self.log.log(
            f"[bold red]☠[/] SIGKILL worker 0 (pid {victim.pid}) mid-work: "
            f"{len(self.victim_held)} leases, {len(self.victim_only)} blobs only it holds"
        )
        return t_kill

    def live_processes_reap_its_leases(self, t_kill: float) -> None:
        """5a. Watch the live processes reap the victim's leases."""
        victim_pid, held = self.workers[0].pid, len(self.victim_held)
        reap_wait = 2 * float(DEMO_POLICIES["reap_interval"]) + 1.0
        remaining = held
        while time.monotonic() - t_kill < reap_wait and remaining:
            remaining = sum(1 for h in self.storage.iter_leases() if h.pid == victim_pid)
            self.log.status = (
                f"leases of dead pid {victim_pid}: {remaining} left "
                f"({time.monotonic() - t_kill:.1f} s after the kill)"
            )
            if remaining:
                time.sleep(0.05)
        self.reaped_before_collect = remaining == 0 and bool(self.victim_held)
        if self.reaped_before_collect:
            self.log.log(
                f"[green]✓[/] its {held} leases were reaped by the live workers "
                f"{time.monotonic() - t_kill:.2f} s after the kill"
            )

    def collect_frees_only_its_content(self, shared_with_victim: list[ContentId]) -> None:
        """5b. collect(): the victim's own content goes, what it shared stays."""
        storage, victim_only = self.storage, self.victim_only
        self.report = storage.collect()
        left = [h for h in storage.iter_leases() if h.pid == self.workers[0].pid]
        self.leases_reaped = len(self.victim_held) - len(left)
        gone = [c for c in victim_only if not storage.contains(c)]
        self.bytes_freed = len(gone) * self.config.size
        mark = "[green]✓[/]" if not left and len(gone) == len(victim_only) else "[red]✗[/]"
        self.log.log(
            f"{mark} collect(): {len(left)} of its leases left; {len(gone)} of the "
            f"{len(victim_only)} blobs only it held freed ({self.bytes_freed / 1e6:.1f} MB)"
        )
        self.check(
            "the killed worker's leases are reaped",
            bool(self.victim_held) and not left,
            f"{self.leases_reaped} of {len(self.victim_held)} reaped",
        )
        self.check(
            "content only it held is collected",
            len(gone) == len(victim_only) and self.bytes_freed > 0,
            f"{len(gone)} of {len(victim_only)} blobs gone, {self.bytes_freed} bytes freed",
        )
        kept = [c for c in shared_with_victim if storage.contains(c)]
        self.check(
            "content it shared is kept",
            len(kept) == len(shared_with_victim),
            f"{len(kept)} of {len(shared_with_victim)} shared blobs present",
        )

    def survivors_reread_every_lease(self) -> None:
        """6. Survivors re-read every lease after the reap, then stop."""
        self.log.status = "survivors re-reading every lease after the reap…"
        self.stop.value = 1
        survivors = self.workers[1:]
        finished = _await_done(survivors)
        reads_after = sum(w.final_ok for w in survivors)
        leases_after = sum(w.leases for w in survivors)
        fails = sum(int(self.counters[w.index * _NCOUNTERS + _FAILS]) for w in survivors)
        self.check(
            "every other lease reads verified bytes",
            finished and fails == 0 and reads_after == leases_after,
            f"{reads_after} of {leases_after} leases verified after the reap, "
            f"{fails} failed reads" + (f": {_failures_text(survivors)}" if fails else ""),
        )
        if finished and fails == 0:
            self.log.log(
                f"[green]✓[/] {len(survivors)} survivors re-read their {leases_after} leases "
                "after the reap: all bytes verified"
            )
        for w in survivors:
            w.process.join(timeout=WAIT_TIMEOUT)
            w.status = "done" if w.process.exitcode == 0 else f"exit {w.process.exitcode}"
        self.check(
            "survivors exit cleanly",
            all(w.process.exitcode == 0 for w in survivors),
            ", ".join(f"worker {w.index}: exit {w.process.exitcode}" for w in survivors),
        )
        self.t_end_work = time.perf_counter()

    def nothing_leaks(self) -> None:
        """7. Nothing leaked, nothing broken."""
        storage = self.storage
        self.log.status = "checking for leaks and verifying the store…"
        storage.collect()
        leaked = [c for c in self.cids if storage.contains(c)]
        self.check(
            "nothing leaks",
            not leaked,
            f"{len(leaked)} of {self.config.unique} blobs still present",
        )
        if self.temporary:
            st = storage.stats()
            self.check(
                "the store ends empty",
                st.blobs == 0 and st.leases == 0,
                f"{st.blobs} blobs, {st.leases} leases",
            )
        self.check(
            "duplicates are dedup hits",
            self.dedup_hits >= self.config.duplicates,
            f"{self.dedup_hits} dedup hits for {self.config.duplicates} duplicates",
        )
        vreport = storage.verify()
        self.check(
            "verify() is clean",
            not vreport,
            f"{len(vreport.corrupted)} corrupted, {len(vreport.missing)} missing, "
            f"{len(vreport.orphaned)} orphaned",
        )
        if not leaked and not vreport:
            self.log.log("[green]✓[/] nothing leaked; verify() is clean")

    def result(self) -> DemoResult:
        return _result(
            self.config,
            self.storage,
            self.workers,
            self.counters,
            self.invariants,
            self.t0,
            self.t_work,
            self.dedup_hits,
            victim_leases=len(self.victim_held),
            victim_only=len(self.victim_only),
            leases_reaped=self.leases_reaped,
            bytes_freed=self.bytes_freed,
            reaped_before_collect=self.reaped_before_collect,
            collect=self.report,
            t_end_work=self.t_end_work,
        )


def _run(run: _Run) -> DemoResult:
    """The phases in order, live on the run's console."""
    run.announce()
    stored = run.store_with_dedup_hits()
    run.spawn_workers()
    run.display = _Display(run.console, run.workers, run.counters)
    with run.display:
        run.display.log(stored)
        if not run.workers_lease_by_content_id():
            return run.result()
        shared_with_victim = run.producer_lets_go()
        t_kill = run.sigkill_the_victim_mid_work()
        run.live_processes_reap_its_leases(t_kill)
        run.collect_frees_only_its_content(shared_with_victim)
        run.survivors_reread_every_lease()
        run.nothing_leaks()
    result = run.result()
    if run.console is not None:
        _print_summary(run.console, result)
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
