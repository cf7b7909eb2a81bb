"""``python -m benchmarks.compare BASE [CANDIDATE]``: the comparison of two
trees' benchmark rows.

The comparison logic runs on saved ``python -m benchmarks --json`` documents
(the published RESULTS.json and copies with known changes); one end-to-end run
compares HEAD~1 with this tree on one cheap row at tiny sizes. No timing is
asserted anywhere.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
try:
    from benchmarks.compare import Comparison, collect, compare, report_lines, row_id
finally:
    sys.path.remove(str(ROOT))

PUBLISHED = json.loads((ROOT / "benchmarks" / "RESULTS.json").read_text())


def _scaled(doc: dict[str, Any], factors: dict[str, float]) -> dict[str, Any]:
    """A copy of a results document with the ratios of some rows scaled."""
    out = copy.deepcopy(doc)
    for row in out["rows"]:
        factor = factors.get(row_id(row["name"]))
        if factor is not None and row["ratio"] is not None:
            row["ratio"] *= factor
            row["value"] *= factor
    return out


def _by_id(rows: list[Comparison]) -> dict[str, Comparison]:
    return {c.id: c for c in rows}


def test_medians_spread_and_flags() -> None:
    base_rounds = [_scaled(PUBLISHED, {"3": f, "4a": f}) for f in (1.0, 0.98, 1.02)]
    cand_rounds = [
        # 3: 10% worse in every round, the spreads apart -> SLOWER
        # 4a: 10% worse at the median, but one round inside the base's spread -> slower?
        # 4b: 3% worse -> no flag; 1a: 20% better
        _scaled(PUBLISHED, {"3": 0.90, "4a": 0.85, "4b": 0.97, "1a": 1.2}),
        _scaled(PUBLISHED, {"3": 0.91, "4a": 0.90, "4b": 0.97, "1a": 1.2}),
        _scaled(PUBLISHED, {"3": 0.89, "4a": 1.01, "4b": 0.97, "1a": 1.2}),
    ]
    base, cand = collect(base_rounds), collect(cand_rounds)
    published = {row_id(r["name"]): r for r in PUBLISHED["rows"]}
    assert base["3"].ratios == pytest.approx([published["3"]["ratio"] * f for f in (1, 0.98, 1.02)])
    assert base["3"].ratio == pytest.approx(published["3"]["ratio"])
    rows = _by_id(compare(base, cand))
    assert list(rows) == [row_id(r["name"]) for r in PUBLISHED["rows"]]
    assert rows["3"].change == pytest.approx(-10.0)
    assert rows["3"].flag == "SLOWER"
    assert rows["4a"].change == pytest.approx(-10.0)
    assert rows["4a"].flag == "slower?"
    assert rows["4b"].change == pytest.approx(-3.0)
    assert rows["4b"].flag == ""
    assert rows["1a"].change == pytest.approx(20.0)
    assert rows["1a"].flag == ""
    assert rows["2a"].change == pytest.approx(0.0)
    # met is counted over the rounds, the value is the median
    assert cand["1a"].value == pytest.approx(published["1a"]["value"] * 1.2)


def test_rows_only_one_tree_has_are_skipped_and_said() -> None:
    base_doc = copy.deepcopy(PUBLISHED)
    base_doc["rows"] = [r for r in base_doc["rows"] if not r["name"].startswith("17")]
    cand_doc = copy.deepcopy(PUBLISHED)
    cand_doc["rows"] = [r for r in cand_doc["rows"] if not r["name"].startswith("16 ")]
    unmeasured = next(r for r in cand_doc["rows"] if r["name"].startswith("9 "))
    unmeasured.update(value=None, baseline_value=None, ratio=None, met=None)
    unmeasured["note"] = "not available: redis-server not found"
    rows = _by_id(compare(collect([base_doc]), collect([cand_doc])))
    assert rows["17a"].base is None and rows["17a"].change is None
    assert rows["17a"].flag.startswith("not in base")
    assert rows["16"].candidate is None and rows["16"].flag.startswith("not in candidate")
    assert rows["9"].change is None
    assert "redis-server not found" in rows["9"].flag
    assert list(rows)[-1] == "16"  # the base's extra rows come after the candidate's


def test_report_has_the_comparison_and_both_full_tables() -> None:
    base = collect([PUBLISHED])
    cand = collect([_scaled(PUBLISHED, {"3": 0.5})])
    comparisons = compare(base, cand)
    labels = {"base": "768e925 (commit 768e925)", "candidate": "working tree (commit abc)"}
    for markdown in (False, True):
        lines = report_lines(comparisons, {"base": base, "candidate": cand}, ["head"], labels,
                             markdown=markdown)  # fmt: skip
        text = "\n".join(lines)
        assert text.count("base ratio (median, min-max)") == 1
        assert text.count("baseline value") == 2  # the two full tables
        assert "768e925 (commit 768e925)" in text and "working tree (commit abc)" in text
        assert "beyond the spread: 3;" in text
        for row in PUBLISHED["rows"]:
            assert text.count(row["name"]) == 3, row["name"]
        if markdown:
            assert "| row | base ratio (median, min-max) |" in text
            assert "| -50.0% | SLOWER |" in text


def _compare(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, BLOBLEASES_BENCH_TINY="1", PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_bad_arguments_are_named() -> None:
    proc = _compare("no-such-revision-xyz", "--only", "small", "--rounds", "1")
    assert proc.returncode == 1, proc.stderr
    assert "BASE 'no-such-revision-xyz': neither a directory nor a git revision" in proc.stderr
    proc = _compare("HEAD", "--rounds", "0")
    assert proc.returncode == 2 and "--rounds must be at least 1" in proc.stderr
    proc = _compare(str(ROOT / "benchmarks"), "--rounds", "1")
    assert proc.returncode == 1 and "a directory without benchmarks/run.py" in proc.stderr


def test_end_to_end_against_the_previous_commit(tmp_path: Path) -> None:
    try:
        previous = _git("rev-parse", "--verify", "--quiet", "HEAD~1^{commit}")
    except (OSError, subprocess.CalledProcessError):
        reason = "not a git checkout with a commit before HEAD (a shallow clone?)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    out, md = tmp_path / "cmp.json", tmp_path / "cmp.md"
    proc = _compare("HEAD~1", "--quick", "--only", "small", "--rounds", "1",
                    "--json", str(out), "--markdown", str(md))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert [row["id"] for row in doc["rows"]] == ["3"]
    assert doc["base"]["commit"] and previous.startswith(doc["base"]["commit"])
    assert doc["candidate"]["path"] == str(ROOT)
    for side in ("base", "candidate"):
        (run,) = doc[side]["runs"]
        assert run["machine"]["mode"] == "tiny"
        assert doc["rows"][0][side]["ratios"], doc["rows"][0]
    # the temporary worktree of HEAD~1 is gone, from the disk and from git
    base_path = doc["base"]["path"]
    assert not os.path.exists(base_path)
    assert base_path not in _git("worktree", "list", "--porcelain")
    assert "== Comparison" in proc.stdout and "== base: HEAD~1" in proc.stdout
    assert "## candidate: working tree" in md.read_text()
