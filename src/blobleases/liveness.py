"""Process liveness: is a pid still the process that took a lease?

A process is identified by its pid *and* its start time, so a pid reused by
a new process never keeps a dead process's leases alive. Zombies are dead.
"""

from __future__ import annotations

import os
from functools import lru_cache

import psutil

__all__ = [
    "START_TIME_TOLERANCE",
    "is_alive",
    "own_start_time",
    "process_start_time",
    "same_start",
]

#: Start times come from clock ticks since boot; two readings of the same
#: process agree far closer than this, and two processes sharing a pid
#: cannot start this close together.
START_TIME_TOLERANCE = 0.05


def process_start_time(pid: int) -> float | None:
    """The start time of live process ``pid`` (seconds since the epoch), or
    None if there is no such process or it is a zombie."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return 0.0  # exists but hidden from us: alive, start time unknown


@lru_cache(maxsize=4)
def _start_time_of(pid: int) -> float:
    start = process_start_time(pid)
    return 0.0 if start is None else start


def own_start_time() -> float:
    """This process's start time (cached per pid, so it is right after fork)."""
    return _start_time_of(os.getpid())


def is_alive(pid: int, start_time: float | None) -> bool:
    """Whether ``pid`` is alive and (when ``start_time`` is known and not 0)
    is the same process that started at ``start_time``."""
    now_start = process_start_time(pid)
    return now_start is not None and same_start(start_time, now_start)


def same_start(recorded: float | None, current: float | None) -> bool:
    """Whether two start times name the same process (an unknown one, None
    or 0, matches any)."""
    if not recorded or not current:
        return True
    return abs(recorded - current) <= START_TIME_TOLERANCE
