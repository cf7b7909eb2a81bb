"""``python -m benchmarks --plot DIR``: PNG charts of saved results, run as a
user runs it (a child process), from a small results file of each kind the
runner writes (--json and --markdown), and from the published results."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

if importlib.util.find_spec("matplotlib") is None:
    _REASON = "matplotlib is not installed (pip install 'blobleases[bench]')"
    if os.environ.get("CI"):
        pytest.fail(_REASON, pytrace=False)
    pytest.skip(_REASON, allow_module_level=True)


def _row(name: str, value: float, unit: str, baseline: str, base: float, **kw: object) -> dict:
    higher = kw.pop("higher", True)
    ratio = value / base if higher else base / value
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_value": base,
        "ratio": round(ratio, 4),
        "target": kw.get("target"),
        "met": kw.get("met"),
        "note": "",
    }


ROWS = [
    _row("1a store 1 MiB, DirectoryStorage", 1274, "MiB/s", "tempfile", 1120, target=">= 0.9x", met=True),
    _row("3 store+drop 4 KiB", 5712, "cycles/s", "diskcache", 6611, target=">= 2x", met=False),
    _row("4a lease acquire+drop", 23933, "pairs/s", "dict", 1530103, target=">= 50,000 pairs/s", met=False),
    _row("6c fan-out RSS sum", 431, "MiB", "mp pipe", 431, higher=False),
    {"name": "10 handoff (optional)", "value": None, "unit": "ms", "baseline": "ray",
     "baseline_value": None, "ratio": None, "target": None, "met": None, "note": "n/a"},
    _row("12a map, LeaseExecutor, small result", 303, "ms", "ProcessPoolExecutor (pickles)", 241, higher=False),
    _row("12b map, LeaseExecutor, small result", 303, "ms", "joblib (loky)", 336, higher=False),
    _row("15a cold start: LeaseExecutor() + first result", 23.7, "ms", "ray.init() + first task", 4767, higher=False),
    _row("16 line iteration, BlobReader (shm://)", 103, "ms", "io.BufferedReader", 29.3, higher=False),
]  # fmt: skip


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _plot(out: Path, *results: Path) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "benchmarks", "--plot", str(out)]
    for path in results:
        args += ["--results", str(path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MPLBACKEND": "Agg"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _check_charts(out: Path, proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr
    charts = [out / "bench-ratios.png", out / "bench-executor.png"]
    assert proc.stdout.split() == [str(p) for p in charts]
    for chart in charts:
        width, height = _png_size(chart)
        assert width >= 600 and height >= 300, (chart, width, height)
        assert chart.stat().st_size > 10_000  # drawn, not an empty canvas


def test_plot_from_the_json_the_runner_writes(tmp_path: Path) -> None:
    results = tmp_path / "rows.json"
    results.write_text(json.dumps({"rows": ROWS, "machine": {}, "command": "x"}))
    out = tmp_path / "charts"
    _check_charts(out, _plot(out, results))


def test_plot_from_a_markdown_table(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.harness import Row, Target
        from benchmarks.run import markdown
    finally:
        sys.path.remove(str(ROOT))
    rows = [
        Row("1a store", "MiB/s", "tempfile", Target(">=", 0.9), value=1274.0, baseline_value=1120.0),
        Row("12a map, LeaseExecutor", "ms", "ProcessPoolExecutor (pickles)",
            higher_is_better=False, value=303.0, baseline_value=241.0),
    ]  # fmt: skip
    info = {"nproc": 2, "cpu": "x", "memory_gib": 1, "python": "3", "os": "Linux",
            "commit": "0", "mode": "tiny", "stat": "median"}  # fmt: skip
    results = tmp_path / "rows.md"
    results.write_text("# results\n\n" + markdown(rows, info, "python -m benchmarks"))
    out = tmp_path / "charts"
    proc = _plot(out, results)
    assert proc.returncode == 0, proc.stderr
    assert _png_size(out / "bench-ratios.png")[0] >= 600
    assert _png_size(out / "bench-executor.png")[0] >= 300


def test_plot_from_the_published_results(tmp_path: Path) -> None:
    """The default source, benchmarks/RESULTS.json, holds every row (1-17)."""
    doc = json.loads((ROOT / "benchmarks" / "RESULTS.json").read_text())
    numbers = {int(r["name"].split()[0].rstrip("abcdef")) for r in doc["rows"]}
    assert numbers == set(range(1, 18))
    out = tmp_path / "charts"
    _check_charts(out, _plot(out))


def test_plot_of_a_file_without_rows_fails_clearly(tmp_path: Path) -> None:
    results = tmp_path / "empty.md"
    results.write_text("no table here\n")
    proc = _plot(tmp_path / "charts", results)
    assert proc.returncode == 1
    assert "no benchmark rows" in proc.stderr
    assert not (tmp_path / "charts" / "bench-ratios.png").exists()
