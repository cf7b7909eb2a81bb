"""`blobleases demo`, run as a real program: the SIGKILLed worker's leases
are reaped, its content collected, and every invariant holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SMALL = ["--workers", "2", "--blobs", "8", "--size", "64KiB"]


def run_demo(*args: str, store: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("BLOBLEASES_STORE", None)
    env["COLUMNS"] = "100"
    prefix = [] if store is None else ["--store", str(store)]
    return subprocess.run(
        [sys.executable, "-m", "blobleases", *prefix, "demo", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def check_figures(result: dict[str, Any], *, workers: int, blobs: int, size: int) -> None:
    assert result["ok"] is True, result["failed"]
    assert result["failed"] == []
    assert result["invariants"] and all(inv["ok"] for inv in result["invariants"])
    assert result["workers"] == workers and result["blobs"] == blobs
    assert 0 < result["dedup_hits"] < blobs
    assert result["unique_blobs"] + result["dedup_hits"] == blobs
    assert result["bytes"] == result["unique_blobs"] * size
    # The SIGKILLed worker's leases were all reaped and its own content freed.
    assert result["victim_pid"] > 0
    assert result["victim_leases"] > 0
    assert result["leases_reaped"] == result["victim_leases"]
    assert result["victim_only_blobs"] > 0
    assert result["bytes_freed"] == result["victim_only_blobs"] * size
    assert result["verified_reads"] > 0 and result["verified_bytes"] > 0
    assert result["throughput_mb_s"] > 0 and result["seconds"] > 0
    names = {inv["name"] for inv in result["invariants"]}
    assert "the killed worker's leases are reaped" in names
    assert "every other lease reads verified bytes" in names


def test_demo_json_small() -> None:
    proc = run_demo(*SMALL, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    result = json.loads(proc.stdout)
    check_figures(result, workers=2, blobs=8, size=64 * 1024)
    assert result["store"] == "temp://"


def test_demo_human_output_on_a_given_store(tmp_path: Path) -> None:
    store = tmp_path / "demo-store"
    proc = run_demo("--workers", "3", "--blobs", "12", "--size", "32768", store=store)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    out = proc.stdout
    assert "SIGKILL worker 0" in out
    for label in (
        "blobs",
        "bytes",
        "dedup hits",
        "throughput",
        "leases reaped",
        "bytes freed",
        "seconds",
    ):
        assert label in out, label
    assert "MB/s" in out and "invariants hold" in out
    # The store it ran on is left with nothing: no blob, no lease.
    listed = subprocess.run(
        [sys.executable, "-m", "blobleases", "--store", str(store), "--json", "stats"],
        capture_output=True,
        text=True,
        check=True,
    )
    stats = json.loads(listed.stdout)
    assert stats["blobs"] == 0 and stats["leases"] == 0


def test_demo_rejects_bad_settings() -> None:
    for args in (["--workers", "1"], ["--blobs", "3"], ["--size", "0"], ["--size", "lots"]):
        proc = run_demo(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and "Error:" in proc.stderr


def test_demo_needs_a_store_other_processes_can_open() -> None:
    proc = run_demo(*SMALL, "--store", "memory://")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "memory://" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
