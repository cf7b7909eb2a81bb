"""Compare the benchmark rows of two trees, in one run on one machine.

    python -m benchmarks.compare BASE [CANDIDATE] [--rounds N] [--only ROWS] [--quick]
                                 [--markdown FILE] [--json FILE]

``BASE`` and ``CANDIDATE`` are each a git revision (checked out into a
temporary ``git worktree add --detach``, removed at the end, also after
Ctrl-C) or the path of a tree; ``CANDIDATE`` defaults to the working tree
that holds this file. Each tree is measured by **its own**
``python -m benchmarks --json`` (its own ``src`` and its own rows, which change
over time), so each row group still runs in a fresh child process.

Rounds alternate: round 1 runs the base then the candidate, round 2 the
candidate then the base, and so on. The metric compared is each row's
``ratio`` (blobleases against the baseline measured in the same process, so
machine noise cancels out of it; higher is better), as the median over the
rounds with its min-max spread. A row is flagged ``SLOWER`` when the
candidate's median ratio is more than 5% below the base's and the two
spreads do not overlap (the candidate's best round is below the base's
worst), ``slower?`` when it is more than 5% below but within the spread.
Rows only one tree has are listed and said so, never compared.

The command is a report: it exits 0 whatever the figures say, 1 when a
benchmark run or git fails, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/compare.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import fmt

__all__ = ["Comparison", "RowRounds", "collect", "compare", "main", "report_lines"]

#: The working tree this file belongs to: the default candidate.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: How much lower a candidate's median ratio may be before the row is flagged.
SLOWER_BY = 0.05

SIDES = ("base", "candidate")


class CompareError(Exception):
    """A tree could not be prepared or a benchmark run failed."""


# -- the comparison (pure: saved RESULTS.json documents in, rows out) -----------


def row_id(name: str) -> str:
    """A row's id, the first word of its name (``"4a"`` of ``"4a lease acquire+drop, ..."``)."""
    return name.split(" ", 1)[0]


@dataclass
class RowRounds:
    """One row of one tree over every round: each round's figures, in order."""

    id: str
    name: str
    unit: str
    baseline: str | None
    target: str | None
    values: list[float] = field(default_factory=list)
    baseline_values: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    met: list[bool] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None

    @property
    def value(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def baseline_value(self) -> float | None:
        return statistics.median(self.baseline_values) if self.baseline_values else None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "baseline": self.baseline,
            "target": self.target,
            "value": self.value,
            "baseline_value": self.baseline_value,
            "ratio": self.ratio,
            "ratios": self.ratios,
            "met": self.met,
            "notes": self.notes,
        }


def collect(docs: Sequence[dict[str, Any]]) -> dict[str, RowRounds]:
    """The rows of several runs of one tree (``python -m benchmarks --json``
    documents, one per round), by row id, in the order they first appear."""
    rows: dict[str, RowRounds] = {}
    for doc in docs:
        for raw in doc["rows"]:
            rid = row_id(raw["name"])
            row = rows.setdefault(
                rid,
                RowRounds(rid, raw["name"], raw["unit"], raw.get("baseline"), raw.get("target")),
            )
            if raw.get("value") is not None:
                row.values.append(float(raw["value"]))
            if raw.get("baseline_value") is not None:
                row.baseline_values.append(float(raw["baseline_value"]))
            if raw.get("ratio") is not None:
                row.ratios.append(float(raw["ratio"]))
            if raw.get("met") is not None:
                row.met.append(bool(raw["met"]))
            note = raw.get("note") or ""
            if note and note not in row.notes:
                row.notes.append(note)
    return rows


@dataclass
class Comparison:
    """One row of the comparison table."""

    id: str
    name: str
    base: RowRounds | None
    candidate: RowRounds | None

    @property
    def change(self) -> float | None:
        """The candidate's median ratio against the base's, in percent (negative: worse)."""
        b = self.base.ratio if self.base else None
        c = self.candidate.ratio if self.candidate else None
        if b is None or c is None or b <= 0:
            return None
        return (c / b - 1.0) * 100.0

    @property
    def flag(self) -> str:
        """``SLOWER`` (more than 5% worse, beyond the spread), ``slower?``
        (more than 5% worse, within it), or why the row is not compared."""
        if self.base is None:
            return "not in base (its benchmarks lack this row): skipped"
        if self.candidate is None:
            return "not in candidate: skipped"
        change = self.change
        if change is None:
            return "not compared: " + _why_unmeasured(self.base, self.candidate)
        if change >= -SLOWER_BY * 100.0:
            return ""
        if max(self.candidate.ratios) < min(self.base.ratios):
            return "SLOWER"
        return "slower?"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "base": self.base.to_json() if self.base else None,
            "candidate": self.candidate.to_json() if self.candidate else None,
            "change_percent": self.change,
            "flag": self.flag,
        }


def _why_unmeasured(base: RowRounds, candidate: RowRounds) -> str:
    parts = []
    for side, row in (("base", base), ("candidate", candidate)):
        if not row.ratios:
            parts.append(f"no ratio in the {side}" + (f" ({row.notes[0]})" if row.notes else ""))
    return "; ".join(parts) or "a zero base ratio"


def compare(base: dict[str, RowRounds], candidate: dict[str, RowRounds]) -> list[Comparison]:
    """Every row either tree has, matched by row id, in the candidate's order
    (rows only the base has come after)."""
    out = [Comparison(rid, row.name, base.get(rid), row) for rid, row in candidate.items()]
    out += [
        Comparison(rid, row.name, row, None) for rid, row in base.items() if rid not in candidate
    ]
    return out


# -- tables ---------------------------------------------------------------------


def _spread(row: RowRounds | None) -> str:
    if row is None or not row.ratios:
        return "n/a"
    median = f"{row.ratio:.3g}x"
    if len(row.ratios) == 1:
        return median
    return f"{median} ({min(row.ratios):.3g}-{max(row.ratios):.3g})"


COMPARE_HEADERS = ["row", "base ratio (median, min-max)", "candidate ratio", "change", "flag"]
TREE_HEADERS = ["row", "value", "unit", "baseline", "baseline value", "ratio", "target", "met"]


def comparison_cells(rows: Sequence[Comparison]) -> list[list[str]]:
    cells = []
    for c in rows:
        change = c.change
        cells.append(
            [
                c.name,
                _spread(c.base),
                _spread(c.candidate),
                f"{change:+.1f}%" if change is not None else "-",
                c.flag,
            ]
        )
    return cells


def _met(row: RowRounds) -> str:
    if not row.met:
        return "-" if row.values else "n/a"
    yes = sum(row.met)
    if yes == len(row.met):
        return "yes"
    return "NO" if yes == 0 else f"{yes}/{len(row.met)} rounds"


def tree_cells(rows: dict[str, RowRounds]) -> list[list[str]]:
    """A tree's full table: medians over the rounds (the ratio with its spread)."""
    return [
        [
            r.name,
            fmt(r.value) if r.values else "n/a",
            r.unit,
            r.baseline or "-",
            fmt(r.baseline_value),
            _spread(r),
            r.target or "-",
            _met(r),
        ]
        for r in rows.values()
    ]


def text_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> list[str]:
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return lines


def markdown_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in cells:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return lines


def report_lines(
    comparisons: Sequence[Comparison],
    trees: dict[str, dict[str, RowRounds]],
    header: Sequence[str],
    labels: dict[str, str],
    *,
    markdown: bool = False,
) -> list[str]:
    """The report: the comparison table, then each tree's full table
    (``labels``: how to name each side, e.g. its revision and commit)."""
    table = markdown_table if markdown else text_table
    mark = "##" if markdown else "=="
    out = [*header, "", f"{mark} Comparison (ratios: higher is better)", ""]
    out += table(COMPARE_HEADERS, comparison_cells(comparisons))
    flagged = [c.id for c in comparisons if c.flag == "SLOWER"]
    noisy = [c.id for c in comparisons if c.flag == "slower?"]
    skipped = [c.id for c in comparisons if c.change is None]
    out.append("")
    out.append(
        f"More than {SLOWER_BY:.0%} slower beyond the spread: {', '.join(flagged) or 'none'}; "
        f"more than {SLOWER_BY:.0%} slower within the spread: {', '.join(noisy) or 'none'}; "
        f"not compared: {', '.join(skipped) or 'none'}."
    )
    for side in SIDES:
        out += ["", f"{mark} {side}: {labels[side]}, medians over the rounds", ""]
        out += table(TREE_HEADERS, tree_cells(trees[side]))
        notes = [f"{r.id}: {n}" for r in trees[side].values() for n in r.notes]
        if notes:
            out.append("")
            out += [f"- {n}" if markdown else f"  {n}" for n in notes]
    return out


# -- running the trees ------------------------------------------------------------


@dataclass
class Tree:
    """A tree to measure: what the user named and where it is checked out."""

    side: str
    spec: str
    path: str
    commit: str = ""
    runs: list[dict[str, Any]] = field(default_factory=list)


def _git(repo: str, *args: str) -> str:
    proc = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompareError(f"git {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout.strip()


@contextlib.contextmanager
def checked_out(side: str, spec: str | None, repo: str, scratch: str) -> Iterator[Tree]:
    """The tree ``spec`` names: the working tree (None), a directory, or a git
    revision of ``repo`` checked out into a detached worktree under
    ``scratch`` that is removed when the block exits, however it exits."""
    arg = "BASE" if side == "base" else "CANDIDATE"
    if spec is None:
        yield Tree(side, "working tree", repo)
        return
    if os.path.isdir(spec):
        path = os.path.abspath(spec)
        for needed in ("benchmarks/run.py", "src/blobleases/__init__.py"):
            if not os.path.exists(os.path.join(path, needed)):
                raise CompareError(f"{arg} {spec!r}: a directory without {needed}")
        yield Tree(side, spec, path)
        return
    proc = subprocess.run(
        ["git", "-C", repo, "rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise CompareError(f"{arg} {spec!r}: neither a directory nor a git revision of {repo}")
    sha = proc.stdout.strip()
    path = os.path.join(scratch, side)
    try:
        _git(repo, "worktree", "add", "--detach", "--quiet", path, sha)
        yield Tree(side, spec, path)
    finally:
        # not _git: this must not raise over the error that ended the block
        subprocess.run(
            ["git", "-C", repo, "worktree", "remove", "--force", path], capture_output=True
        )
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["git", "-C", repo, "worktree", "prune"], capture_output=True)


def tree_env(tree: Tree, scratch: str) -> dict[str, str]:
    """The environment of a tree's runs: its ``src`` and its ``benchmarks``
    first on the path (nothing of the caller's PYTHONPATH), bytecode cached
    outside the tree so a given tree is left as it was."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(tree.path, "src"), tree.path])
    env["PYTHONPYCACHEPREFIX"] = os.path.join(scratch, "pycache")
    return env


def check_imports(tree: Tree, scratch: str) -> None:
    """Fail unless ``blobleases`` and ``benchmarks`` import from the tree itself."""
    code = "import blobleases, benchmarks; print(blobleases.__file__); print(benchmarks.__file__)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tree.path,
        env=tree_env(tree, scratch),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise CompareError(f"{tree.side} {tree.spec}: cannot import: {proc.stderr.strip()}")
    root = os.path.realpath(tree.path) + os.sep
    for path in proc.stdout.split():
        if not os.path.realpath(path).startswith(root):
            raise CompareError(f"{tree.side} {tree.spec}: imports {path}, not from {tree.path}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End a benchmark run and every process of its session: SIGINT first
    (the run removes its scratch directory), SIGKILL what is left."""
    for sig, grace in ((signal.SIGINT, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
            break
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_benchmarks(tree: Tree, args: Sequence[str], scratch: str, label: str) -> dict[str, Any]:
    """One ``python -m benchmarks --json`` of the tree, in its own session;
    its progress goes to stderr, its table is not shown (the report has them)."""
    out = os.path.join(scratch, f"{label}.json")
    cmd = [sys.executable, "-m", "benchmarks", "--plain", "--json", out, *args]
    stdout = os.path.join(scratch, f"{label}.txt")
    with open(stdout, "wb") as f:
        proc = subprocess.Popen(
            cmd, cwd=tree.path, env=tree_env(tree, scratch), stdout=f, start_new_session=True
        )
        try:
            code = proc.wait()
        except BaseException:
            _stop(proc)
            raise
    if code != 0:
        raise CompareError(f"{label}: {shlex.join(cmd[1:])} in {tree.path} exited with {code}")
    try:
        with open(out) as f:
            doc: dict[str, Any] = json.load(f)
        if not isinstance(doc["rows"], list):
            raise ValueError("'rows' is not a list")
    except (OSError, ValueError, KeyError) as exc:
        raise CompareError(f"{label}: no results in {out}: {exc}") from exc
    return doc


def run_rounds(trees: Sequence[Tree], rounds: int, args: Sequence[str], scratch: str) -> None:
    """``rounds`` rounds of every tree, the order of the trees alternating."""
    for n in range(rounds):
        order = trees if n % 2 == 0 else list(reversed(trees))
        for tree in order:
            label = f"round{n + 1}-{tree.side}"
            print(
                f"[{time.strftime('%H:%M:%S')}] round {n + 1}/{rounds}: {tree.side} "
                f"({tree.spec}, {tree.path})",
                file=sys.stderr,
                flush=True,
            )
            doc = run_benchmarks(tree, args, scratch, label)
            tree.runs.append(doc)
            tree.commit = str(doc.get("machine", {}).get("commit", "unknown"))
        if n == 0 and not any(doc["rows"] for tree in trees for doc in tree.runs):
            raise CompareError("--only selected no row in either tree")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="Compare every benchmark row's ratio between two trees, in alternating "
        "rounds on this machine; a report (exit 0 whatever the figures).",
    )
    parser.add_argument("base", metavar="BASE", help="a git revision or the path of a tree")
    parser.add_argument(
        "candidate",
        metavar="CANDIDATE",
        nargs="?",
        help="a git revision or the path of a tree (default: the working tree)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per tree (default 3)")
    parser.add_argument("--only", metavar="ROWS", help="as python -m benchmarks --only")
    parser.add_argument("--quick", action="store_true", help="as python -m benchmarks --quick")
    parser.add_argument("--markdown", metavar="FILE", help="write the report as Markdown")
    parser.add_argument("--json", metavar="FILE", help="write every run and the comparison")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")
    if args.only is not None and not args.only.strip(" ,"):
        parser.error("--only names no row")
    for name in ("markdown", "json"):
        path = getattr(args, name)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"--{name} {path!r}: no such directory")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench_args = (["--quick"] if args.quick else []) + (["--only", args.only] if args.only else [])
    command = "python -m benchmarks.compare " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    previous = signal.signal(signal.SIGTERM, _terminate)
    scratch = tempfile.mkdtemp(prefix="blobleases-compare-")
    load_before = os.getloadavg()
    try:
        with (
            checked_out("base", args.base, ROOT, scratch) as base,
            checked_out("candidate", args.candidate, ROOT, scratch) as candidate,
        ):
            trees = [base, candidate]
            for tree in trees:
                check_imports(tree, scratch)
            run_rounds(trees, args.rounds, bench_args, scratch)
    except CompareError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("compare: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    load_after = os.getloadavg()

    rows = {tree.side: collect(tree.runs) for tree in trees}
    comparisons = compare(rows["base"], rows["candidate"])
    machine = dict(candidate.runs[-1].get("machine", {}))
    only = f"`python -m benchmarks --json{' ' + shlex.join(bench_args) if bench_args else ''}`"
    header = [
        f"Command: `{command}`",
        f"base: {base.spec} (commit {base.commit}); "
        f"candidate: {candidate.spec} (commit {candidate.commit}).",
        f"{args.rounds} round(s) of each tree's own {only}, alternating which tree goes first; "
        f"mode {machine.get('mode')}, {machine.get('stat')} of interleaved repetitions per run.",
        f"Machine: {machine.get('nproc')} CPUs ({machine.get('cpu')}), "
        f"Python {machine.get('python')}, {machine.get('os')}; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after.",
    ]
    labels = {tree.side: f"{tree.spec} (commit {tree.commit})" for tree in trees}
    for line in report_lines(comparisons, rows, header, labels):
        print(line)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(
                "\n".join(report_lines(comparisons, rows, header, labels, markdown=True)) + "\n"
            )
    if args.json:
        doc = {
            "command": command,
            "rounds": args.rounds,
            "load_average": [load_before[0], load_after[0]],
            "threshold": SLOWER_BY,
            "rows": [c.to_json() for c in comparisons],
        } | {
            tree.side: {
                "spec": tree.spec,
                "path": tree.path,
                "commit": tree.commit,
                "runs": tree.runs,
            }
            for tree in trees
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
