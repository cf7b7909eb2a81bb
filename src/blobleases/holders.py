"""Who holds a blob: the facts ``blobleases why`` and ``top`` show of the
processes behind leases and readers (SPEC section 9).

A backend reports each holder's pid and, where it knows, the host and pid
namespace the pid belongs to (:class:`~blobleases.reports.LeaseInfo`,
:class:`~blobleases.reports.ReaderInfo`). Only a pid of this machine and pid
namespace (``local``) can be looked up here; :func:`process_facts` does that
with psutil.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import psutil

__all__ = ["ProcessFacts", "process_facts", "scope_host"]


@dataclass(frozen=True, slots=True)
class ProcessFacts:
    """A live local process: its name, command line and start time (seconds
    since the epoch). ``cmdline`` is empty where the system hides it (a
    zombie, another user's process under ``hidepid``)."""

    pid: int
    name: str
    cmdline: tuple[str, ...]
    started: float


def process_facts(pid: int, started: float | None = None) -> ProcessFacts | None:
    """The facts of live local process ``pid``, or None if no such process
    is alive (or, when ``started`` is known and not 0, the pid now names a
    later process than the one that started then)."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            name = proc.name()
            created = proc.create_time()
            try:
                cmdline = tuple(proc.cmdline())
            except (psutil.AccessDenied, psutil.ZombieProcess):
                cmdline = ()
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, ValueError):
        return None
    if started and abs(created - started) > 1.0:
        return None
    return ProcessFacts(pid, name, cmdline, created)


def scope_host(scope: str | None, own_scope: str) -> tuple[str | None, bool]:
    """The host text and locality of a DirectoryStorage pid ``scope``
    (``<pid namespace inode>@<boot id>``, see
    :func:`blobleases.liveness.pid_scope`), seen from a process of
    ``own_scope``: local when the two are equal (or ``scope`` is unknown); the same machine (this
    host's name, with the other namespace) when only the boot ids match."""
    host = socket.gethostname() or "localhost"
    if scope is None or scope == own_scope:
        return host, True
    namespace, _, boot = scope.partition("@")
    if boot and boot == own_scope.partition("@")[2]:
        return f"{host} (pid namespace {namespace})", False
    return f"another boot or machine (boot id {boot or '?'}, pid namespace {namespace})", False
