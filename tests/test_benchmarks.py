"""The benchmark command works: ``python -m benchmarks --quick`` with tiny sizes.

No timing is asserted here (timings live in the benchmarks, never in tests);
this only checks that the command runs, prints the table and writes every row
with every field, and that ``met`` agrees with the numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"name", "value", "unit", "baseline", "baseline_value", "ratio", "target", "met"}
#: Every row of issue 7 (and row 11 of issue 12), by the id each row name starts with.
ROW_IDS = [
    "1a", "1b", "2a", "2b", "3", "4a", "4b", "5a", "5b", "5c", "5d",
    "6a", "6b", "6c", "6d", "6e", "6f", "7", "8a", "8b", "9", "10", "11a", "11b", "11c",
    "12a", "12b", "12c", "12d", "12e", "12f", "13a", "13b", "13c", "13d",
    "14a", "14b", "14c", "15a", "15b", "15c", "16", "17a", "17b",
]  # fmt: skip


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, BLOBLEASES_BENCH_TINY="1")
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _check_row(row: dict[str, Any]) -> None:
    assert set(row) >= FIELDS, row
    assert isinstance(row["name"], str) and row["name"]
    assert isinstance(row["unit"], str)
    if row["value"] is None:
        # Not measured: it must say why, and claim nothing.
        assert row["note"], row
        assert row["met"] is None and row["ratio"] is None, row
        return
    assert isinstance(row["value"], float) and math.isfinite(row["value"]), row
    if row["baseline_value"] is not None:
        assert row["ratio"] is not None and row["ratio"] > 0, row
    if row["target"] is None:
        assert row["met"] is None, row
    else:
        assert isinstance(row["met"], bool), row


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench") / "rows.json"
    proc = _run("-m", "benchmarks", "--quick", "--plain", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, json.loads(out.read_text())


def test_every_row_with_every_field(tiny_run: tuple[str, dict[str, Any]]) -> None:
    _, doc = tiny_run
    rows = doc["rows"]
    ids = [row["name"].split(" ", 1)[0] for row in rows]
    assert ids == ROW_IDS
    for row in rows:
        _check_row(row)
    assert doc["machine"]["mode"] == "tiny"


def test_no_row_failed(tiny_run: tuple[str, dict[str, Any]]) -> None:
    """A row may be "not available" (a backend not installed), never an error."""
    _, doc = tiny_run
    errors = [row for row in doc["rows"] if row["note"].startswith("error")]
    assert not errors, errors


def test_memory_rows_are_measured(tiny_run: tuple[str, dict[str, Any]]) -> None:
    _, doc = tiny_run
    by_id = {row["name"].split(" ", 1)[0]: row for row in doc["rows"]}
    for row_id in ("4b", "8b"):
        assert by_id[row_id]["value"] is not None, by_id[row_id]


def test_table_printed(tiny_run: tuple[str, dict[str, Any]]) -> None:
    stdout, doc = tiny_run
    for row in doc["rows"]:
        assert row["name"] in stdout
    assert "baseline" in stdout and "ratio" in stdout


def test_script_entry_and_only(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    md = tmp_path / "table.md"
    proc = _run("benchmarks/run.py", "--only", "lease", "--json", str(out), "--markdown", str(md))
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["name"].split(" ", 1)[0] for row in rows] == ["4a", "4b"]
    assert "| row |" in md.read_text()
    # the table's rows as JSON beside it, for --plot --results
    assert json.loads((tmp_path / "table.json").read_text())["rows"] == rows


def test_met_and_ratio_follow_the_numbers() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.harness import Row, Target
    finally:
        sys.path.remove(str(ROOT))
    at_least_2x = Target(">=", 2.0)
    assert at_least_2x.met(None, 2.5) is True
    assert at_least_2x.met(None, 1.5) is False
    assert at_least_2x.met(None, None) is None
    at_most_1s = Target("<=", 1.0, on="value", unit="s")
    assert at_most_1s.met(0.5, 9.0) is True
    assert at_most_1s.met(1.5, 0.1) is False
    faster = Row("r", "MiB/s", "b", at_least_2x, value=300.0, baseline_value=100.0)
    assert faster.ratio == 3.0 and faster.met is True
    quicker = Row("t", "s", "b", at_least_2x, higher_is_better=False, value=2.0, baseline_value=3.0)
    assert quicker.ratio == 1.5 and quicker.met is False
