"""Every ```python block of README.md runs as pasted into a new file: each in
a fresh interpreter, in an empty temporary directory, and exits 0."""

from __future__ import annotations

from pathlib import Path

import pytest

from code_blocks import ROOT, python_blocks, run_block

BLOCKS = python_blocks(ROOT / "README.md")
#: Blocks that name hosts this machine does not have, and why they cannot run.
NEEDS_HOSTS = {
    "cache.internal": "the Redis example connects to servers named cache.internal",
    "db.internal": "the PostgreSQL example connects to servers named db.internal",
}


def test_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_block_runs(number: int, tmp_path: Path) -> None:
    run_block(f"README block {number}", BLOCKS[number], tmp_path, NEEDS_HOSTS)
