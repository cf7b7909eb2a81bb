"""Charts of benchmark results: ``python -m benchmarks --plot DIR``.

Reads saved results (the JSON that ``--json FILE`` writes, or a Markdown table
that ``--markdown FILE`` writes; by default ``benchmarks/RESULTS.json``, the
latest published rows) and writes two PNG charts into DIR:

* ``bench-ratios.png``: rows 1-11, how many times better blobleases is than
  each baseline (log scale; 1x is parity), coloured by whether the row meets
  its target, with ratio targets marked;
* ``bench-executor.png``: rows 12-16, LeaseExecutor (and BlobReader) beside
  ProcessPoolExecutor, joblib and Ray, one panel per measurement, in its own
  unit.

Needs matplotlib (the ``bench`` extra). Runs no benchmark.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_RESULTS",
    "EXECUTOR_FIRST_ROW",
    "load_rows",
    "plot_executor",
    "plot_ratios",
    "plot_results",
    "rows_from_markdown",
]

#: The latest published rows (the tables of benchmarks/RESULTS.md and the README).
DEFAULT_RESULTS = Path(__file__).resolve().parent / "RESULTS.json"
#: Rows from this number on are the executor rows (LeaseExecutor against its peers).
EXECUTOR_FIRST_ROW = 12

_ROW_ID = re.compile(r"(\d+)([a-z]?)\s")
_RATIO_TARGET = re.compile(r">=\s*([\d.]+)x")
_COLOURS = {True: "#2e7d32", False: "#c62828", None: "#78909c"}
_CANDIDATE = "#1565c0"
_PEER = "#b0bec5"


def _number(text: str) -> float | None:
    """``1,274`` -> 1274.0; ``n/a``, ``-`` and ``infx`` -> None."""
    text = text.strip().removesuffix("x").replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def rows_from_markdown(text: str) -> list[dict[str, Any]]:
    """The rows of every results table (``| row | value | unit | ...``) in
    ``text``, as the dictionaries the runner's JSON holds."""
    rows: list[dict[str, Any]] = []
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip().replace("\\|", "|") for c in line.strip().strip("|").split(" | ")]
        if header is None:
            header = cells if cells[:2] == ["row", "value"] else None
            continue
        if set(line) <= set("|-: "):
            continue
        cell = dict(zip(header, cells, strict=False))
        met = cell.get("met", "-")
        rows.append(
            {
                "name": cell["row"],
                "value": _number(cell["value"]),
                "unit": cell.get("unit", ""),
                "baseline": None if cell.get("baseline", "-") == "-" else cell["baseline"],
                "baseline_value": _number(cell.get("baseline value", "-")),
                "ratio": _number(cell.get("ratio", "-")),
                "target": None if cell.get("target", "-") == "-" else cell["target"],
                "met": {"yes": True, "NO": False}.get(met),
                "note": "",
            }
        )
    return rows


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows saved in ``path``: the runner's JSON (``{"rows": [...]}``)
    or Markdown holding its tables. ValueError if it holds none."""
    text = Path(path).read_text(encoding="utf-8")
    if str(path).endswith(".json"):
        doc = json.loads(text)
        rows = doc["rows"] if isinstance(doc, dict) else doc
    else:
        rows = rows_from_markdown(text)
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: no benchmark rows in it")
    return rows


def _row_id(row: dict[str, Any]) -> tuple[int, str] | None:
    match = _ROW_ID.match(row["name"] + " ")
    return (int(match.group(1)), match.group(2)) if match else None


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width, break_long_words=False)) or text


def _value_text(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _candidate(name: str) -> str:
    """What a row measures of blobleases, as a bar label."""
    for api in ("LeaseExecutor", "BlobReader"):
        if api in name:
            return api
    return "blobleases"


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_ratios(rows: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """A horizontal bar per row before the executor rows that has a ratio;
    None (and no file) when there is none."""
    chosen = [
        r
        for r in rows
        if r.get("ratio") is not None
        and (rid := _row_id(r)) is not None
        and rid[0] < EXECUTOR_FIRST_ROW
        and r["ratio"] > 0
    ]
    if not chosen:
        return None
    chosen.reverse()  # matplotlib draws the first bar at the bottom
    labels = [_wrap(f"{r['name']}  vs {r['baseline']}", 70) for r in chosen]
    ratios = [float(r["ratio"]) for r in chosen]
    fig = _figure(11, 0.42 * len(chosen) + 1.6)
    ax = fig.add_subplot()
    y = range(len(chosen))
    # bars grow from parity: right of 1x blobleases is better, left worse
    ax.barh(
        y,
        [r - 1.0 for r in ratios],
        left=1.0,
        color=[_COLOURS[r.get("met")] for r in chosen],
        height=0.7,
    )
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1)
    low, high = min(ratios), max(ratios)
    ax.set_xlim(min(low / 2, 0.25), max(high * 12, 4.0))
    for i, (r, ratio) in enumerate(zip(chosen, ratios, strict=True)):
        target = r.get("target") or ""
        match = _RATIO_TARGET.match(target)
        label = f"{ratio:.2f}x"
        if match:
            ax.plot(float(match.group(1)), i, marker="|", markersize=16, color="black")
        elif target:  # a target on the value itself (e.g. pairs/s), not on the ratio
            label += f"  (target {target})"
        # right of the bar, or of the parity line for a bar that grows left
        ax.text(max(ratio, 1.0) * 1.06, i, label, va="center", fontsize=8)
    ax.set_yticks(list(y), labels, fontsize=7.5)
    ax.set_xlabel("ratio: how many times better blobleases is (log scale; 1x = parity)")
    ax.set_title("blobleases against the ways Python programs share bytes today")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax.legend(
        handles=[
            Patch(color=_COLOURS[True], label="meets its target"),
            Patch(color=_COLOURS[False], label="misses its target"),
            Patch(color=_COLOURS[None], label="no target"),
            Line2D([], [], marker="|", linestyle="", markersize=12, color="black", label="target"),
        ],
        loc="lower right",
        fontsize=8,
    )
    ax.grid(axis="x", which="both", alpha=0.25)
    out = Path(path)
    fig.savefig(out)
    return out


def _panels(rows: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Executor rows grouped by what blobleases measured (the rows of one
    measurement share their name and differ in the baseline)."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in rows:
        rid = _row_id(r)
        if rid is None or rid[0] < EXECUTOR_FIRST_ROW or r.get("value") is None:
            continue
        name = r["name"].split(" ", 1)[1] if " " in r["name"] else r["name"]
        groups.setdefault((rid[0], name), []).append(r)
    return list(groups.values())


def _short(text: str) -> str:
    """A peer's label: its name without the parenthesis."""
    return text.split(" (")[0]


def _bar_label(text: str) -> str:
    """A label narrow enough for its bar: ``ProcessPoolExecutor`` on two lines."""
    text = re.sub(r"(\w)Executor", r"\1\nExecutor", text)
    return "\n".join(_wrap(line, 14) for line in text.split("\n"))


def plot_executor(rows: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """One bar panel per executor measurement: blobleases' value beside each
    baseline's, in the row's unit; None (and no file) when there is none."""
    panels = _panels(rows)
    if not panels:
        return None
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = _figure(4.0 * cols, 3.6 * nrows + 0.6)
    fig.suptitle("LeaseExecutor beside ProcessPoolExecutor, joblib and Ray (lower is better)")
    for k, group in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, k + 1)
        first = group[0]
        values = [float(first["value"])]
        labels = [_candidate(first["name"])]
        for r in group:
            if r.get("baseline_value") is not None:
                values.append(float(r["baseline_value"]))
                labels.append(_short(r.get("baseline") or "baseline"))
        colours = [_CANDIDATE] + [_PEER] * (len(values) - 1)
        ax.bar(range(len(values)), values, color=colours)
        positive = [v for v in values if v > 0]
        if positive and max(positive) / min(positive) > 30:
            ax.set_yscale("log")
        top = max(values) if values else 1.0
        for i, v in enumerate(values):
            ax.text(i, v, _value_text(v), ha="center", va="bottom", fontsize=8)
        ax.set_ylim(top=top * (3 if ax.get_yscale() == "log" else 1.18) if top > 0 else 1.0)
        ax.set_xticks(range(len(values)), [_bar_label(x) for x in labels], fontsize=7.5)
        ax.set_ylabel(first.get("unit") or "")
        rid = _row_id(first)
        number = f"{rid[0]}" if rid else ""
        title = first["name"].split(" ", 1)[1] if " " in first["name"] else first["name"]
        ax.set_title(_wrap(f"row {number}: {title}", 42), fontsize=8.5)
        ax.grid(axis="y", alpha=0.25)
    out = Path(path)
    fig.savefig(out)
    return out


def plot_results(results: Sequence[str | Path] | None, directory: str | Path) -> list[Path]:
    """Both charts from the rows of ``results`` (later files win for rows of
    the same name; default :data:`DEFAULT_RESULTS`) into ``directory``."""
    merged: dict[str, dict[str, Any]] = {}
    for source in results or [DEFAULT_RESULTS]:
        for row in load_rows(source):
            merged[row["name"]] = row
    rows = list(merged.values())
    rows.sort(key=lambda r: _row_id(r) or (10**6, r["name"]))
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        plot_ratios(rows, out / "bench-ratios.png"),
        plot_executor(rows, out / "bench-executor.png"),
    ]
    return [p for p in written if p is not None]
