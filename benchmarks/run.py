"""Run every benchmark row and print the table.

    python -m benchmarks [--quick] [--json FILE] [--markdown FILE] [--only PATTERN]
    python -m benchmarks --plot DIR [--results FILE]...
    python benchmarks/run.py ...

Each row measures blobleases and its baseline in the same process, interleaving
their repetitions, and reports the median (``--stat best`` for best-of). Each
row group runs in a fresh child process (``--same-process`` to run them all in
this one).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import fnmatch
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import (
    Context,
    Row,
    Sizes,
    Unavailable,
    fmt,
    machine_info,
)
from benchmarks.rows_executor import executor_rows
from benchmarks.rows_handoff import fanout_rows, handoff_rows, ray_rows
from benchmarks.rows_latency import latency_rows
from benchmarks.rows_lifecycle import reap_rows, scale_rows
from benchmarks.rows_local import get_rows, lease_rows, small_rows, store_rows
from benchmarks.rows_postgres import postgres_rows
from benchmarks.rows_redis import redis_rows

__all__ = ["GROUPS", "main"]

#: A row group: (number, name, the function that measures its rows).
Group = tuple[str, str, Callable[[Context], None]]

#: Every row group, in the order of issue 7.
GROUPS: list[Group] = [
    ("1", "store", store_rows),
    ("2", "get", get_rows),
    ("3", "small", small_rows),
    ("4", "lease", lease_rows),
    ("5", "handoff", handoff_rows),
    ("6", "fanout", fanout_rows),
    ("7", "reap", reap_rows),
    ("8", "scale", scale_rows),
    ("9", "redis", redis_rows),
    ("10", "ray", ray_rows),
    ("11", "latency", latency_rows),
    # issue 13's rows 11-15, numbered 12-16 here
    ("12", "executor", executor_rows),
    # issue 15: PostgresStorage
    ("17", "postgres", postgres_rows),
]

#: Issue 4 (acceptance 6) targets, checked on rows of issue 7: (row prefix, on, op, threshold).
ISSUE4_CHECKS = [
    ("1a ", "store >= 0.8x the raw baseline", "ratio", 0.8),
    ("2a ", "get_data >= 0.8x a raw read", "ratio", 0.8),
    ("4a ", ">= 20,000 lease acquire+drop pairs/s", "value", 20_000.0),
]


def _selected(number: str, name: str, patterns: Sequence[str]) -> bool:
    if not patterns:
        return True
    for pattern in patterns:
        p = pattern.strip().lower()
        if not p:
            continue
        if p == number or p in name or fnmatch.fnmatch(name, p) or fnmatch.fnmatch(number, p):
            return True
    return False


def run_groups(
    ctx: Context,
    patterns: Sequence[str],
    profile_dir: str | None = None,
    *,
    isolate: bool = True,
) -> None:
    """Run the selected row groups in order. ``isolate``: each in a fresh
    child process (forked from this one, which measures nothing itself), as
    pyperf runs each benchmark in its own worker: a row's figures then do not
    depend on which rows ran before it (the allocator's state, caches, open
    files), and ``--only N`` reproduces the full run's row N."""
    for group in GROUPS:
        if not _selected(group[0], group[1], patterns):
            continue
        if isolate:
            _run_group_in_child(ctx, group, profile_dir)
        else:
            _run_group(ctx, group, profile_dir)


def _run_group_in_child(ctx: Context, group: Group, profile_dir: str | None) -> None:
    number, name, _ = group
    mp = multiprocessing.get_context("fork")
    receive, send = mp.Pipe(duplex=False)
    first = len(ctx.rows)

    def child() -> None:
        try:
            _run_group(ctx, group, profile_dir)
        finally:
            send.send((ctx.rows[first:], ctx._dirs))
            send.close()

    proc = mp.Process(target=child, name=f"benchmarks-row-{number}")
    proc.start()
    send.close()
    result: tuple[list[Row], int] | None = None
    with contextlib.suppress(EOFError):  # the child died without sending its rows
        result = receive.recv()
    proc.join()
    if result is None:
        reason = f"error: the process running row {number} exited with code {proc.exitcode}"
        ctx.log(f"    {reason}")
        ctx.rows.append(Row(f"{number} {name}", "", note=reason, group=name))
        return
    rows, ctx._dirs = result
    ctx.rows.extend(rows)


def _run_group(ctx: Context, group: Group, profile_dir: str | None) -> None:
    number, name, fn = group
    ctx.group = name
    first = len(ctx.rows)
    ctx.log(f"[{time.strftime('%H:%M:%S')}] row {number} ({name}) ...")
    t0 = time.perf_counter()
    reason = ""
    profiler = cProfile.Profile() if profile_dir else None
    try:
        if profiler is not None:
            profiler.runcall(fn, ctx)
        else:
            fn(ctx)
    except Unavailable as exc:
        reason = f"not available: {exc}"
    except Exception as exc:
        reason = f"error: {type(exc).__name__}: {exc}"
        ctx.log(traceback.format_exc())
    if profiler is not None and profile_dir:
        out = os.path.join(profile_dir, f"{number}-{name}.prof")
        profiler.dump_stats(out)
        ctx.log(f"    profile: {out} (python -m pstats {out})")
    group_rows = ctx.rows[first:]
    if reason:
        for row in group_rows:
            if not row.measured:
                row.note = f"{reason}; {row.note}" if row.note else reason
        if not group_rows:
            ctx.rows.append(Row(f"{number} {name}", "", note=reason, group=name))
    ctx.log(f"    done in {time.perf_counter() - t0:.1f} s{'  (' + reason + ')' if reason else ''}")


def _met_text(row: Row) -> str:
    if row.met is None:
        return "-" if row.measured else "n/a"
    return "yes" if row.met else "NO"


def _cells(row: Row) -> list[str]:
    ratio = row.ratio
    return [
        row.name,
        fmt(row.value) if row.measured else "n/a",
        row.unit,
        row.baseline or "-",
        fmt(row.baseline_value),
        f"{ratio:.2f}x" if ratio is not None else "-",
        row.target.text if row.target else "-",
        _met_text(row),
    ]


HEADERS = ["row", "value", "unit", "baseline", "baseline value", "ratio", "target", "met"]


def issue4_lines(rows: Sequence[Row]) -> list[str]:
    lines = []
    for prefix, text, on, threshold in ISSUE4_CHECKS:
        row = next((r for r in rows if r.name.startswith(prefix)), None)
        if row is None:
            continue
        measured = row.ratio if on == "ratio" else row.value
        if measured is None:
            verdict = "n/a (not measured)"
        else:
            shown = f"{measured:.3f}x" if on == "ratio" else f"{fmt(measured)}/s"
            verdict = f"{shown}: {'met' if measured >= threshold else 'MISSED'}"
        lines.append(f"issue 4: {text} (row {prefix.strip()}): {verdict}")
    return lines


def notes_lines(rows: Sequence[Row]) -> list[str]:
    """Row notes, rows with the same note on one line."""
    by_note: dict[str, list[str]] = {}
    for r in rows:
        if r.note:
            by_note.setdefault(r.note, []).append(r.name.split(" ", 1)[0])
    return [f"{', '.join(ids)}: {note}" for note, ids in by_note.items()]


def print_table(rows: Sequence[Row], info: dict[str, Any], plain: bool) -> None:
    title = (
        f"blobleases benchmarks ({info['mode']} mode, {info['stat']} of interleaved repetitions) "
        f"on {info['nproc']} x {info['cpu']}, {info['memory_gib']} GiB, "
        f"Python {info['python']}, {info['os']}, commit {info['commit']}"
    )
    footer = issue4_lines(rows) + notes_lines(rows)
    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            plain = True
    if plain:
        widths = [max(len(h), *(len(_cells(r)[i]) for r in rows)) for i, h in enumerate(HEADERS)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(HEADERS, widths, strict=True)))
        print("  ".join("-" * w for w in widths))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(_cells(r), widths, strict=True)))
        for line in footer:
            print(line)
        return
    console = Console(width=None if sys.stdout.isatty() else 240)
    table = Table(title=title, show_lines=False)
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="right" if i in (1, 4, 5) else "left", overflow="fold")
    style = {"yes": "green", "NO": "bold red", "n/a": "yellow"}
    for r in rows:
        cells = _cells(r)
        cells[-1] = f"[{style[cells[-1]]}]{cells[-1]}[/]" if cells[-1] in style else cells[-1]
        table.add_row(*cells)
    console.print(table)
    for line in footer:
        console.print(line, markup=False, highlight=False)


def markdown(rows: Sequence[Row], info: dict[str, Any], command: str) -> str:
    out = [
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory_gib']} GiB RAM, "
        f"Python {info['python']}, {info['os']}, commit {info['commit']}. "
        f"Mode: {info['mode']}, "
        f"{info['stat']} of interleaved repetitions. Command: `{command}`",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" for _ in HEADERS) + "|",
    ]
    for r in rows:
        cells = [c.replace("|", "\\|") for c in _cells(r)]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.extend(f"- {line}" for line in issue4_lines(rows) + notes_lines(rows))
    return "\n".join(out) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="blobleases benchmarks: every row against its baseline, in one run.",
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under 3 minutes")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON to FILE")
    parser.add_argument("--markdown", metavar="FILE", help="write the table as Markdown to FILE")
    parser.add_argument(
        "--only",
        metavar="PATTERN",
        help="run only these rows: comma-separated numbers or names "
        "(store, get, small, lease, handoff, fanout, reap, scale, redis, ray, latency, executor)",
    )
    parser.add_argument(
        "--stat",
        choices=("median", "best"),
        default="median",
        help="how repetitions are summarised (default: median)",
    )
    parser.add_argument("--plain", action="store_true", help="a plain text table (no rich)")
    parser.add_argument(
        "--plot",
        metavar="DIR",
        help="run nothing: write PNG charts (ratios; executor rows) of saved results to DIR",
    )
    parser.add_argument(
        "--results",
        metavar="FILE",
        action="append",
        help="the saved results --plot draws: a --json or --markdown file of a run "
        "(repeatable; default: benchmarks/RESULTS.json, the latest published rows)",
    )
    parser.add_argument("--workdir", help="scratch directory (default: a new one in $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--redis-server", default="redis-server", help="the redis-server binary")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="write a cProfile of each row group (candidate and baselines) to DIR/<row>.prof",
    )
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="run every row group in this process (default: each in a fresh child process, "
        "so that no row's figures depend on the rows run before it)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot:
        return _plot(args.results, args.plot)
    tiny = args.tiny or os.environ.get("BLOBLEASES_BENCH_TINY") == "1"
    mode = "tiny" if tiny else "quick" if args.quick else "full"
    sizes = Sizes.for_mode(mode)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        workdir = tempfile.mkdtemp(prefix="blobleases-bench-", dir=args.workdir)
    else:
        workdir = tempfile.mkdtemp(prefix="blobleases-bench-")
    ctx = Context(sizes, workdir, args.stat, redis_server=args.redis_server)
    patterns = args.only.split(",") if args.only else []
    info = machine_info() | {"mode": mode, "stat": args.stat}
    command = "python -m benchmarks" + (" " + " ".join(argv if argv is not None else sys.argv[1:]))
    t0 = time.perf_counter()
    try:
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
        run_groups(ctx, patterns, args.profile, isolate=not args.same_process)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    ctx.log(f"total {info['seconds']} s")
    print_table(ctx.rows, info, args.plain)
    doc = {
        "rows": [r.to_json() for r in ctx.rows],
        "machine": info,
        "command": command.strip(),
        "issue4": issue4_lines(ctx.rows),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(ctx.rows, info, command.strip()))
        # the same rows as JSON beside the table, for --plot --results
        with open(os.path.splitext(args.markdown)[0] + ".json", "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return 0


def _plot(results: Sequence[str] | None, directory: str) -> int:
    try:
        from benchmarks.plot import plot_results

        written = plot_results(results, directory)
    except ImportError as exc:
        print(f"--plot needs matplotlib: pip install 'blobleases[bench]' ({exc})", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError) as exc:
        print(f"--plot: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
