"""The benchmark harness: rows, targets, interleaved timing, tables and JSON.

Conventions (the same for every row):

* ``value`` is what blobleases measured and ``baseline_value`` what the named
  baseline measured in the same run, on the same machine, interleaved
  repetition by repetition (candidate, baseline, baseline, candidate, ...) so
  that noise from other tenants hits both alike.
* ``ratio`` is always "how many times better blobleases is" (higher is
  better): ``value / baseline_value`` for rates (higher is better) and
  ``baseline_value / value`` for times and sizes (lower is better).
* ``met`` is computed from the row's :class:`Target` and the measured
  numbers; it is None when the row has no target or was not measured.
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "Context",
    "Row",
    "Sizes",
    "Target",
    "Unavailable",
    "interleave",
    "machine_info",
    "summarise",
]

MiB = 1 << 20
KiB = 1 << 10


class Unavailable(Exception):
    """Raised by a row group when a backend or tool it needs is missing."""


@dataclass(frozen=True, slots=True)
class Target:
    """A target on the ratio (``on="ratio"``) or on the value (``on="value"``)."""

    op: Literal[">=", "<="]
    threshold: float
    on: Literal["ratio", "value"] = "ratio"
    unit: str = "x"
    label: str = ""  # how to print it, when not the default

    @property
    def text(self) -> str:
        if self.label:
            return self.label
        if self.on == "ratio":
            return f"{self.op} {self.threshold:g}x"
        return f"{self.op} {_fmt(self.threshold)} {self.unit}".rstrip()

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        measured = ratio if self.on == "ratio" else value
        if measured is None or math.isnan(measured):
            return None
        if self.op == ">=":
            return measured >= self.threshold
        return measured <= self.threshold


@dataclass(slots=True)
class Row:
    """One line of the table. ``value``/``baseline_value`` stay None until measured."""

    name: str
    unit: str
    baseline: str | None = None
    target: Target | None = None
    higher_is_better: bool = True
    value: float | None = None
    baseline_value: float | None = None
    note: str = ""
    group: str = ""

    @property
    def ratio(self) -> float | None:
        v, b = self.value, self.baseline_value
        if v is None or b is None:
            return None
        if self.higher_is_better:
            return v / b if b else math.inf
        return b / v if v else math.inf

    @property
    def met(self) -> bool | None:
        if self.target is None or self.value is None:
            return None
        return self.target.met(self.value, self.ratio)

    @property
    def measured(self) -> bool:
        return self.value is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": _json_num(self.value),
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_value": _json_num(self.baseline_value),
            "ratio": _json_num(self.ratio),
            "target": self.target.text if self.target else None,
            "met": self.met,
            "note": self.note,
        }


def _json_num(x: float | None) -> float | None:
    if x is None or math.isnan(x) or math.isinf(x):
        return None
    return float(f"{x:.6g}")


def _fmt(x: float | None) -> str:
    """A number with about three significant digits and thousands separators."""
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


fmt = _fmt


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each row does; ``full``, ``quick`` and ``tiny`` (tests only)."""

    mode: str
    reps: int  # interleaved repetitions per measured method
    blob: int  # the "1 MiB" blob of rows 1, 2 and 9
    store_batch: int  # blobs stored per repetition (row 1)
    read_batch: int  # reads per repetition (row 2)
    small: int  # the "4 KiB" blob of row 3
    small_batch: int  # store+drop cycles per repetition (row 3)
    lease_batch: int  # acquire+drop pairs per repetition (rows 4 and 8)
    handoff: int  # the "64 MiB" of rows 5, 6 and 10
    handoff_reps: int
    fanout_children: int
    reap_leases: int  # row 7
    reap_reps: int
    scale_small: int  # row 8
    scale_large: int
    scale_reps: int  # many short interleaved repetitions: rows 8 are noise-prone
    scale_batch: int
    redis_batch: int  # row 9

    @classmethod
    def for_mode(cls, mode: str) -> Sizes:
        if mode == "full":
            return cls(
                mode="full",
                reps=11,
                blob=MiB,
                store_batch=64,
                read_batch=512,
                small=4 * KiB,
                small_batch=1000,
                lease_batch=10_000,
                handoff=64 * MiB,
                handoff_reps=11,
                fanout_children=4,
                reap_leases=10_000,
                reap_reps=3,
                scale_small=10_000,
                scale_large=1_000_000,
                scale_reps=15,
                scale_batch=3000,
                redis_batch=64,
            )
        if mode == "quick":
            return cls(
                mode="quick",
                reps=7,
                blob=MiB,
                store_batch=32,
                read_batch=256,
                small=4 * KiB,
                small_batch=400,
                lease_batch=5000,
                handoff=64 * MiB,
                handoff_reps=5,
                fanout_children=4,
                reap_leases=10_000,
                reap_reps=1,
                scale_small=10_000,
                scale_large=100_000,
                scale_reps=9,
                scale_batch=2000,
                redis_batch=32,
            )
        if mode == "tiny":
            return cls(
                mode="tiny",
                reps=2,
                blob=64 * KiB,
                store_batch=4,
                read_batch=4,
                small=4 * KiB,
                small_batch=10,
                lease_batch=50,
                handoff=MiB,
                handoff_reps=1,
                fanout_children=2,
                reap_leases=100,
                reap_reps=1,
                scale_small=100,
                scale_large=400,
                scale_reps=2,
                scale_batch=50,
                redis_batch=4,
            )
        raise ValueError(f"unknown mode {mode!r}")


def size_text(n: int) -> str:
    """``1 MiB``, ``4 KiB``, ``64 MiB``, or bytes."""
    if n % MiB == 0:
        return f"{n // MiB} MiB"
    if n % KiB == 0:
        return f"{n // KiB} KiB"
    return f"{n} B"


def count_text(n: int) -> str:
    """``1,000,000`` style."""
    return f"{n:,}"


# -- timing ---------------------------------------------------------------------


@contextmanager
def no_gc() -> Iterator[None]:
    """Disable the cyclic garbage collector around a timed section (as timeit does)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def interleave(
    reps: int, methods: Sequence[Callable[[], float]], *, warmup: bool = True
) -> list[list[float]]:
    """Run each method ``reps`` times, alternating the order every repetition
    (A B C, C B A, A B C, ...), and return each method's measurements.

    Every method runs one repetition and returns one measurement (seconds per
    operation, or any number where the caller knows the direction). With
    ``warmup`` each method first runs once unrecorded (imports, page cache,
    connection set-up, lazily built statements).
    """
    if warmup:
        for method in methods:
            method()
    results: list[list[float]] = [[] for _ in methods]
    order = list(range(len(methods)))
    for rep in range(reps):
        sequence = order if rep % 2 == 0 else order[::-1]
        for i in sequence:
            results[i].append(methods[i]())
    return results


def summarise(samples: Sequence[float], stat: str, lower_is_better: bool = True) -> float:
    """The median, or the best sample (min if lower is better, else max)."""
    if not samples:
        return math.nan
    if stat == "best":
        return min(samples) if lower_is_better else max(samples)
    return statistics.median(samples)


def per_op(n: int, fn: Callable[[], object]) -> float:
    """Seconds per operation of one call of ``fn`` that does ``n`` of them
    (the cyclic garbage collector off)."""
    with no_gc():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) / n


class UniqueBlobs:
    """Distinct blobs of one size: random bytes with a running counter in front."""

    def __init__(self, size: int) -> None:
        if size < 16:
            raise ValueError(f"blobs must be at least 16 bytes, not {size}")
        self.size = size
        self._base = os.urandom(size)
        self._counter = itertools.count(1)
        self._salt = os.urandom(8)

    def make(self, n: int) -> list[bytes]:
        tail = self._salt + self._base[16:]
        return [next(self._counter).to_bytes(8, "little") + tail for _ in range(n)]


# -- context --------------------------------------------------------------------


@dataclass
class Context:
    """What row groups share: sizes, a work directory and the rows produced."""

    sizes: Sizes
    workdir: str
    stat: str = "median"
    rows: list[Row] = field(default_factory=list)
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)
    redis_server: str = "redis-server"
    group: str = ""
    _dirs: int = 0

    def row(
        self,
        name: str,
        unit: str,
        baseline: str | None = None,
        target: Target | None = None,
        *,
        higher_is_better: bool = True,
    ) -> Row:
        """Declare a row now (so it is reported even if measuring it fails)."""
        r = Row(name, unit, baseline, target, higher_is_better, group=self.group)
        self.rows.append(r)
        return r

    def path(self, name: str) -> str:
        """A fresh path (not created) inside the work directory."""
        self._dirs += 1
        return os.path.join(self.workdir, f"{self._dirs:02d}-{name}")

    def summary(self, samples: Sequence[float], lower_is_better: bool = True) -> float:
        return summarise(samples, self.stat, lower_is_better)


def source_version() -> str:
    """The git commit of the code measured (``-dirty`` if the tree has changes)."""
    import subprocess

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--exclude", "*"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine_info() -> dict[str, Any]:
    """nproc, CPU model, memory, Python and OS, for the report."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib: float | None = None
    try:
        import psutil

        mem_gib = round(psutil.virtual_memory().total / (1 << 30), 1)
    except Exception:
        mem_gib = None
    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": model,
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "os": f"{platform.system()} {platform.release()}",
        "commit": source_version(),
    }
