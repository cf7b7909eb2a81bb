"""The operations commands of the command line (SPEC section 9): ``why``,
``top`` and ``metrics``. Registered on :data:`blobleases.cli.app` when
:mod:`blobleases.cli` is imported; errors follow its rules (one line on
stderr, exit 1)."""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from .cli import (
    CidArg,
    CliError,
    JsonOpt,
    StoreOpt,
    _content_id,
    _one_line,
    _out,
    _plural,
    _print_json,
    _print_table,
    _storage,
    _use,
    _when,
    app,
    human_size,
)
from .errors import BlobLeaseError
from .holders import ProcessFacts, process_facts
from .reports import LeaseInfo, ReaderInfo, WhyReport
from .storage import BlobStorage

__all__ = ["duration", "why_json"]


def duration(seconds: float | None) -> str:
    """``45s``, ``3m 20s``, ``2h 5m``, ``4d 1h`` (two units at most); ``-``
    for unknown."""
    if seconds is None:
        return "-"
    secs = max(int(seconds + 0.5), 0)
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if secs >= size or (unit == "s" and not parts):
            parts.append(f"{secs // size}{unit}")
            secs %= size
    return " ".join(parts[:2])


def _facts(pid: int | None, local: bool, cache: dict[int, ProcessFacts | None]) -> Any:
    """(alive: True/False/None when it cannot be known here, facts or None)."""
    if pid is None or not local:
        return None, None
    if pid not in cache:
        cache[pid] = process_facts(pid)
    facts = cache[pid]
    return facts is not None, facts


def _process_json(facts: ProcessFacts | None) -> dict[str, Any] | None:
    if facts is None:
        return None
    return {"name": facts.name, "cmdline": list(facts.cmdline), "started": facts.started}


def why_json(report: WhyReport, now: float | None = None) -> dict[str, Any]:
    """The JSON of ``blobleases why``: the blob, every lease (with the facts
    of its process when alive and local, age, ttl left, and the open readers
    of its process), every process with open readers, and ``retained``."""
    now = time.time() if now is None else now
    cache: dict[int, ProcessFacts | None] = {}
    readers_of: dict[int, int] = {}
    for r in report.readers:
        if r.pid is not None:
            readers_of[r.pid] = readers_of.get(r.pid, 0) + r.count

    def lease(info: LeaseInfo) -> dict[str, Any]:
        alive, facts = _facts(info.pid, info.local, cache)
        return {
            "lease_id": str(info.lease_id),
            "pid": info.pid,
            "host": info.host,
            "local": info.local,
            "alive": alive,
            "process": _process_json(facts),
            "created_at": info.created_at,
            "age": None if info.created_at is None else max(now - info.created_at, 0.0),
            "expires_at": info.expires_at,
            "ttl_left": None if info.expires_at is None else max(info.expires_at - now, 0.0),
            "detached": info.detached,
            "readers": readers_of.get(info.pid, 0),
        }

    def reader(info: ReaderInfo) -> dict[str, Any]:
        alive, facts = _facts(info.pid, info.local, cache)
        return {
            "pid": info.pid,
            "host": info.host,
            "local": info.local,
            "alive": alive,
            "process": _process_json(facts),
            "count": info.count,
        }

    blob = report.info
    return {
        "content_id": str(blob.content_id),
        "size": blob.size,
        "created": blob.created,
        "last_access": blob.last_access,
        "retained": report.retained,
        "lease_count": len(report.leases),
        "reader_count": blob.reader_count,
        "leases": [lease(i) for i in report.leases],
        "readers": [reader(i) for i in report.readers],
    }


def _process_cell(entry: dict[str, Any]) -> str:
    if entry["process"] is not None:
        return str(entry["process"]["name"])
    if entry["alive"] is None:
        return "(not local)" if not entry["local"] else "?"
    return "(dead)"


@app.command()
def why(
    cid: CidArg,
    store: StoreOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Show every holder of a blob and why it is kept.

    Each lease: lease id, pid, host, process name and command line (when
    alive and on this machine), age, ttl left, detached or not, and the open
    readers of its process; then every process with open readers; and
    whether retention alone keeps the blob (unreferenced, kept as cache).
    Takes no lease and changes nothing. Ages are unknown ("-") on backends
    that do not record when a lease was taken.
    """
    _use(store, json_output)
    content_id = _content_id(cid)
    report = _storage().why(content_id)
    result = why_json(report)
    if _state_json():
        _print_json(result)
        return
    out = _out()
    out.print(
        f"{result['content_id']}  {human_size(result['size'])}  "
        f"created {_when(result['created'])}  last access {_when(result['last_access'])}"
    )
    if result["retained"]:
        out.print("not held: kept only by retention (unreferenced, cached under retain_bytes)")
    elif not result["leases"] and not result["readers"]:
        out.print("not held by anything (it goes at the next collect)")
    else:
        out.print(
            f"held by {_plural(len(result['leases']), 'lease')} and "
            f"{_plural(result['reader_count'], 'open reader')}"
        )
    if result["leases"]:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for name in ("LEASE ID", "PID", "HOST", "PROCESS", "AGE", "TTL LEFT", "DETACHED"):
            table.add_column(name, no_wrap=True)
        table.add_column("READERS", justify="right")
        for e in result["leases"]:
            table.add_row(
                e["lease_id"],
                str(e["pid"]),
                e["host"] or "-",
                _process_cell(e),
                duration(e["age"]),
                "never" if e["ttl_left"] is None else duration(e["ttl_left"]),
                "yes" if e["detached"] else "no",
                str(e["readers"]),
            )
        _print_table(table)
    if result["readers"]:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for name in ("READER PID", "HOST", "PROCESS"):
            table.add_column(name, no_wrap=True)
        table.add_column("OPEN READERS", justify="right")
        for e in result["readers"]:
            table.add_row(
                "?" if e["pid"] is None else str(e["pid"]),
                e["host"] or "-",
                _process_cell(e),
                str(e["count"]),
            )
        _print_table(table)
    shown: set[int] = set()
    for e in [*result["leases"], *result["readers"]]:
        if e["process"] is not None and e["pid"] not in shown:
            shown.add(e["pid"])
            out.print(
                f"pid {e['pid']}: {' '.join(e['process']['cmdline']) or e['process']['name']}"
            )


def _state_json() -> bool:
    from . import cli

    return cli._state.json


@app.command()
def top(
    interval: Annotated[
        float,
        typer.Option("--interval", metavar="SECONDS", min=0.1, help="Seconds between refreshes."),
    ] = 1.0,
    once: Annotated[
        bool, typer.Option("--once", help="Print one snapshot and exit (even on a terminal).")
    ] = False,
    store: StoreOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """A live full-screen view of the store; q quits.

    Refreshed every second: totals, leases and bytes held per process (name
    and pid), the blobs held longest, and events as they happen (blobs
    stored and freed, leases reaped or expired, evictions). Press q (or
    Ctrl-C) to quit. When standard output is not a terminal, or with --once
    or --json, prints one snapshot and exits.
    """
    from .top import TopState

    _use(store, json_output)
    storage = _storage()
    state = TopState(storage.url)
    state.refresh(storage)
    if _state_json():
        _print_json(state.to_json())
        return
    if once or not sys.stdout.isatty():
        console = _out()
        console.print(state.render())
        return
    _live_top(storage, state, interval)


def _live_top(storage: BlobStorage, state: Any, interval: float) -> None:
    """Redraw ``state`` every ``interval`` seconds on the alternate screen
    until q is pressed; keys are read from stdin in cbreak mode (restored on
    exit), so it works in any terminal, over ssh included."""
    from rich.console import Console
    from rich.live import Live

    console = Console(highlight=False)
    fd: int | None = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None
    footer = "q quits" if fd is not None else "Ctrl-C quits (standard input is not a terminal)"
    try:
        if fd is not None:
            tty.setcbreak(fd)
        with Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                rows = max(3, (console.size.height - 16) // 2)
                live.update(state.render(rows=rows, footer=footer), refresh=True)
                if _wait_for_quit(fd, interval):
                    return
                try:
                    state.refresh(storage)
                except (BlobLeaseError, OSError) as exc:
                    state.error = _one_line(exc)
    except KeyboardInterrupt:
        return
    finally:
        if fd is not None and saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_for_quit(fd: int | None, seconds: float) -> bool:
    """Wait ``seconds``; True as soon as q (or Q) is typed on ``fd``."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if fd is None:
            time.sleep(left)
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            typed = os.read(fd, 64)
            if not typed:  # end of input: no more keys, keep refreshing
                time.sleep(max(deadline - time.monotonic(), 0))
                return False
            if b"q" in typed.lower():
                return True
    return False


@app.command()
def metrics(
    port: Annotated[
        int,
        typer.Option("--port", metavar="N", min=0, max=65535, help="The port (0: any free port)."),
    ] = 9464,
    addr: Annotated[
        str, typer.Option("--addr", metavar="ADDRESS", help="The address to listen on.")
    ] = "127.0.0.1",
    store: StoreOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Serve Prometheus metrics of the store on http://ADDRESS:N/metrics.

    The store's figures as gauges (blobs, bytes, leases, readers, processes,
    retained, dedup hits and evictions by any process). Prints the address
    it serves on, then serves until interrupted (Ctrl-C or SIGTERM). Needs
    the metrics extra: pip install 'blobleases[metrics]'.
    """
    _use(store, json_output)
    try:
        from .metrics import serve
    except ImportError as exc:
        raise CliError(_one_line(exc)) from exc
    storage = _storage()
    try:
        server, _thread, bound = serve(storage, port, addr)
    except OSError as exc:
        raise CliError(f"cannot serve metrics on {addr}:{port}: {_one_line(exc)}") from exc
    url = f"http://{addr}:{bound}/metrics"
    if _state_json():
        # one line: read by whoever started the server, while it serves
        sys.stdout.write(json.dumps({"store": storage.url, "url": url, "port": bound}) + "\n")
        sys.stdout.flush()
    else:
        sys.stdout.write(f"serving {url} (store {storage.url}); Ctrl-C stops\n")
        sys.stdout.flush()
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(3600):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.shutdown()
